"""One entry point for text used by calibration, perplexity and training.

A source is a `datasets` Dataset/IterableDataset (or a dict of them), a built-in name (`"books:calibration"`,
`"books:evaluation"`), a local file or directory (.txt, .json/.jsonl, .parquet, .csv), or a hub dataset with an
optional config written `"name:config"` (e.g. `"wikitext:wikitext-2-raw-v1"`). `datasets` is imported lazily.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store import digest, file_identity

# built-in name -> (split, whole books one after another): the plain names interleave the books passage by
# passage (any prefix spans many books); the ":by-book" names keep each book contiguous (long-context reading)
BUILTIN = {"books:calibration": ("calibration", False), "books:evaluation": ("evaluation", False),
           "books:calibration:by-book": ("calibration", True), "books:evaluation:by-book": ("evaluation", True)}
# file suffix -> `datasets` packaged builder
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # a hub dataset id: "name" or "owner/name"
HUB_CONFIG = re.compile(r"[\w.-]+")


def load_text_dataset(source: Any, split: str | None = None, streaming: bool = True):
    """A `datasets.Dataset` (or `IterableDataset` when `streaming`) for `source`, one split of it.

    split: None takes the only split, else "train" when there is one. Local files form a single "train" split;
    .txt files give one record per paragraph in a "text" column.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        if split is not None and source.split is not None and str(source.split) != split:
            raise ValueError(f"the dataset holds split {source.split!r}, not {split!r}")
        return source
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _select_split(source, split, type(source).__name__)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"expected a datasets Dataset, a file/directory path or a dataset name, got {type(source).__name__}")
    name = str(source)
    kind = check_source(name)
    if kind == "builtin":
        from .books import prepare_books

        split_name, by_book = BUILTIN[name]
        path = prepare_books()[split_name]
        return _books_in_order(path) if by_book else _load_files(path, split, streaming)
    if kind == "path":
        return _load_files(Path(name).expanduser(), split, streaming)
    hub_name, _, config = name.partition(":")
    return _select_split(datasets.load_dataset(hub_name, config or None, streaming=streaming), split, name)


def check_source(name: str) -> str:
    """What the dataset string `name` is: "builtin", "path" (an existing file or directory) or "hub" (the shape of a
    hub dataset id, "owner/name" or "name", with an optional ":config"); anything else is an error that says so,
    checked without reading any data."""
    if name.startswith("books:"):
        if name not in BUILTIN:
            raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN)}")
        return "builtin"
    path = Path(name).expanduser()
    try:
        if path.exists():
            return "path"
    except OSError:  # e.g. a sentence too long for a file name
        pass
    if name.startswith((".", "/", "~")) or path.suffix in BUILDERS:
        raise FileNotFoundError(f"no such file or directory: {name}")
    hub_name, _, config = name.partition(":")
    if len(hub_name) > 96 or not HUB_ID.fullmatch(hub_name) or (config and not HUB_CONFIG.fullmatch(config)):
        shown = repr(name) if len(name) <= 60 else repr(name[:57]) + "..."
        raise ValueError(f"the dataset {shown} is neither a file, a directory, a hub dataset id ('owner/name' or "
                         f"'owner/name:config') nor a built-in name ({', '.join(BUILTIN)})")
    return "hub"


def source_identity(source: Any) -> dict[str, Any] | None:
    """What identifies a text source in a fingerprint: a built-in corpus by its own fingerprint, a local file or
    directory by the names, sizes and mtimes of its files, a `datasets` object by its fingerprint, a list of
    strings by a hash of the texts, a hub dataset by its name; None for a source that cannot be identified (an
    iterator: nothing computed from it is ever reused)."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        if name.startswith("books:"):
            from .books import books_fingerprint

            return {"builtin": name, "corpus": digest(books_fingerprint())}
        path = Path(name).expanduser()
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            return {"path": str(path.resolve()), "files": digest(
                [{**file_identity(p), "name": str(p.relative_to(path)) if path.is_dir() else p.name} for p in files])}
        return {"hub": name}
    if isinstance(getattr(source, "_fingerprint", None), str):  # a datasets Dataset
        return {"datasets": source._fingerprint}
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        return {"texts": digest(list(source))}
    return None


def iter_texts(source: Any, split: str | None = None, text_column: str = "text", streaming: bool = True) -> Iterator[str]:
    """Yield the non-empty strings of `text_column` of `source` (see `load_text_dataset`), one record at a time."""
    dataset = load_text_dataset(source, split=split, streaming=streaming)
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(_missing_column(text_column, columns, source))
    try:
        yield from _column(dataset, text_column, source)
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} is not UTF-8 text: {err.reason} at byte {err.start} of a file in it; pass text "
                         "files (or convert them to UTF-8)") from None


def _column(dataset, text_column: str, source: Any) -> Iterator[str]:
    """The non-empty strings of `text_column` in `dataset`'s records."""
    for record in dataset:
        if text_column not in record:
            raise ValueError(_missing_column(text_column, list(record), source))
        text = record[text_column]
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise TypeError(f"column {text_column!r} of {source} holds {type(text).__name__}, expected str")
        yield text


def _missing_column(column: str, columns: list[str], source: Any) -> str:
    return (f"no column {column!r} in {source}; its columns are {columns}: name the one with the text as text_column "
            "(a key of the config's calibration and evaluations, --text-column of `hf-patch calibrate` and "
            "`hf-patch perplexity`, an argument of calibrate_pca, perplexity and iter_texts)")


def _books_in_order(path: Path):
    """The passages of a prepared books split, each book's passages together and in reading order."""
    import datasets

    by_source: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_source.setdefault(record["source"], []).append(record)
    return datasets.Dataset.from_list([r for records in by_source.values() for r in records])


def _load_files(path: Path, split: str | None, streaming: bool):
    """Load a file, or every file with a known suffix under a directory, with one `datasets` builder."""
    import datasets

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(BUILDERS)} files under {path}")
    builders = {BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise ValueError(f"unsupported file type {path.suffix!r} for {path}; supported: {sorted(BUILDERS)}")
    if len(builders) > 1:
        raise ValueError(f"{path} mixes file types ({sorted(builders)}); keep one kind of file per directory")
    (builder,) = builders
    if builder != "parquet":
        for p in files:
            _check_text_file(p)
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], streaming=streaming, **options)
    return _select_split(dataset, split, str(path))


def _check_text_file(path: Path, size: int = 1 << 16) -> None:
    """Refuse a text file whose first `size` bytes are not UTF-8 text (binary data, another encoding), naming it."""
    with open(path, "rb") as f:
        head = f.read(size)
    try:
        if b"\0" in head:  # valid UTF-8, but no text has it
            raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "a NUL byte")
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): pass text files (or "
                         "convert it to UTF-8)") from None


def _select_split(dataset, split: str | None, source: str):
    """One split of a DatasetDict/IterableDatasetDict, with an error that lists the splits there are."""
    splits = list(dataset)
    if split is None:
        if len(splits) == 1:
            return dataset[splits[0]]
        if "train" in splits:
            return dataset["train"]
        raise ValueError(f"{source} has several splits {splits}; pass split=... to choose one")
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {source}; available splits: {splits}")
    return dataset[split]
