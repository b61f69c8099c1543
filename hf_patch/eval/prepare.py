"""`hf-patch prepare-tasks`: build the data of the local lm-eval tasks under `$HF_PATCH_CACHE/tasks/`.

- `books_ppl`: held-out book passages (the evaluation split of `hf-patch prepare-data`), for perplexity;
- `book_cloze`: a LAMBADA-style last-word cloze built from the same held-out text: a passage of whole sentences
  ends on a content word that already appears earlier in the passage; the model must predict it;
- `bigbench_<task>`: BIG-bench multiple-choice tasks (`social_iqa`, `winowhy`, `strategyqa`,
  `goal_step_wikihow`) read from the PyPI sdist `bigbench==1.0.0` (or a local copy, `--bigbench-sdist`): only
  their `task.json` members are streamed out of the archive, nothing else is unpacked.

Each task is one `<name>.jsonl` file, shuffled with a fixed seed so that lm-eval's `--limit N` takes an unbiased
sample. Everything is deterministic and offline once the book corpus and the sdist are cached.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import random
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..data.books import atomic_directory, cache_root

BOOK_TASKS = ("books_ppl", "book_cloze")
BIGBENCH_TASKS = ("social_iqa", "winowhy", "strategyqa", "goal_step_wikihow")
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PYPI_SIMPLE = "https://pypi.org/simple"
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


def fetch_bigbench_sdist(path: str | Path | None = None, index_url: str = PYPI_SIMPLE) -> Path:
    """The `bigbench==1.0.0` sdist: `path` if given, else the cached copy, else download it once (checked by sha256).

    `pip download` cannot fetch this sdist (pip rejects its metadata: it declares a direct-URL dependency), so
    the file is located through PyPI's simple index (the JSON form pip itself reads) and streamed to the cache.
    Raises FileNotFoundError, saying what to do, where the index does not offer it (some mirrors and proxies
    withhold it).
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no BIG-bench sdist at {path}")
        return path
    target = cache_root() / "downloads" / BIGBENCH_SDIST
    if target.is_file():
        return target
    import urllib.request

    from tqdm.auto import tqdm

    request = urllib.request.Request(f"{index_url.rstrip('/')}/bigbench/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = {f["filename"]: f for f in json.load(response)["files"]}
    if BIGBENCH_SDIST not in files:
        raise FileNotFoundError(
            f"{index_url} does not offer {BIGBENCH_SDIST} (it lists {sorted(files) or 'nothing'}). Get that file, or a "
            "tar.gz of the google/BIG-bench repository (same <top>/bigbench/benchmark_tasks/<task>/task.json "
            "layout), and run `hf-patch prepare-tasks --only bigbench --bigbench-sdist PATH` once; or leave the "
            "hfp_bigbench tasks out")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial, digest = target.with_suffix(".part"), hashlib.sha256()
    with urllib.request.urlopen(files[BIGBENCH_SDIST]["url"], timeout=60) as response, open(partial, "wb") as out, \
            tqdm(total=files[BIGBENCH_SDIST].get("size"), unit="B", unit_scale=True, desc=BIGBENCH_SDIST) as bar:
        while chunk := response.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != BIGBENCH_SHA256:
        partial.unlink()
        raise RuntimeError(f"{BIGBENCH_SDIST}: sha256 {digest.hexdigest()} != {BIGBENCH_SHA256}; download again")
    partial.rename(target)
    return target


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


# ---------------------------------------------------------------- driver


def write_tasks(files: dict[str, list[dict[str, Any]]]) -> None:
    """Write `{name}.jsonl` files into the tasks dir (atomically, keeping the files already there)."""
    target = tasks_dir()
    with atomic_directory(target) as tmp:
        if target.is_dir():
            for old in target.glob("*.jsonl"):
                if old.stem not in files:
                    (tmp / old.name).write_bytes(old.read_bytes())
        for name, records in files.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def prepare_tasks(which: Iterable[str] = ("books", "bigbench"), force: bool = False,
                  bigbench_sdist: str | Path | None = None, cloze_examples: int = CLOZE_EXAMPLES) -> dict[str, Path]:
    """Build the task files of the groups in `which` ("books", "bigbench") unless present; return {name: path}."""
    which = set(which)
    if unknown := which - {"books", "bigbench"}:
        raise ValueError(f"unknown task groups {sorted(unknown)}; choose from 'books', 'bigbench'")
    names = ([*BOOK_TASKS] if "books" in which else []) + (
        [f"bigbench_{t}" for t in BIGBENCH_TASKS] if "bigbench" in which else [])
    todo = [n for n in names if force or not task_file(n).is_file()]
    files: dict[str, list[dict[str, Any]]] = {}
    if any(n.startswith("bigbench_") for n in todo):  # first: a missing sdist fails before any other work
        for task, subtasks in read_bigbench_tasks(fetch_bigbench_sdist(bigbench_sdist)).items():
            files[f"bigbench_{task}"] = bigbench_records(task, subtasks)
    if any(n in BOOK_TASKS for n in todo):
        from ..data.books import prepare_books

        passages = read_jsonl(prepare_books()["evaluation"])
        files["books_ppl"] = books_ppl_records(passages)
        files["book_cloze"] = cloze_records(passages, cloze_examples)
    if files:
        write_tasks(files)
    return {n: task_file(n) for n in names}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=("books", "bigbench"), help="build one group of tasks only")
    parser.add_argument("--bigbench-sdist", help=f"a local {BIGBENCH_SDIST}, or a tar.gz of the BIG-bench repository "
                        "(default: download the sdist once into the cache)")
    parser.add_argument("--cloze-examples", type=int, default=CLOZE_EXAMPLES)
    parser.add_argument("--force", action="store_true", help="rebuild the task files even if they exist")


def run(args: argparse.Namespace) -> int:
    which = [args.only] if args.only else ["books", "bigbench"]
    paths = prepare_tasks(which, force=args.force, bigbench_sdist=args.bigbench_sdist,
                          cloze_examples=args.cloze_examples)
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            print(f"{name}: {sum(1 for _ in f)} examples -> {path}")
    return 0
