"""The built-in books corpus (parsing, splitting, preparation) and `iter_texts` over every kind of source."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from hf_patch.data import books
from hf_patch.data.books import interleave, prepare_books, read_r_lazyload, split_passages, strip_gutenberg
from hf_patch.data.store import MARKER, NotOurs, atomic_directory
from hf_patch.data.text import iter_texts, load_text_dataset

datasets = pytest.importorskip("datasets")


# ---------------------------------------------------------------- parsing and splitting

def test_strip_gutenberg_modern_markers():
    text = ("The Project Gutenberg EBook of Emma\nlicence blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***\n\nEMMA\n\nChapter I\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***\nmore licence\n")
    assert strip_gutenberg(text) == "EMMA\n\nChapter I"


def test_strip_gutenberg_old_markers_and_plain_text():
    text = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nHAMLET\n\nEnd of Project Gutenberg Etext of Hamlet\n"
    assert strip_gutenberg(text) == "HAMLET"
    assert strip_gutenberg("\n  Just a play.\n\n") == "Just a play."


def test_split_passages_packs_whole_paragraphs():
    paragraphs = [f"para {i} " + "x" * (10 * i) for i in range(1, 30)]
    text = "\r\n\r\n".join(paragraphs) + "\n   \n\n\n"  # CRLF and whitespace-only lines are paragraph breaks too
    passages = split_passages(text, max_chars=120)
    assert all(len(p) <= 120 or "\n\n" not in p for p in passages)  # only a lone oversized paragraph may exceed
    assert [q for p in passages for q in p.split("\n\n")] == paragraphs  # nothing lost, reordered or cut
    assert len(passages) < len(paragraphs)  # short paragraphs were packed together
    assert split_passages("one\nline\n\ntwo", max_chars=100) == ["one\nline\n\ntwo"]
    with pytest.raises(ValueError, match="positive"):
        split_passages("x", max_chars=0)


def test_interleave_round_robin():
    records = interleave({"A": ["a1", "a2", "a3"], "B": ["b1"]})
    assert [(r["source"], r["text"]) for r in records] == [("A", "a1"), ("B", "b1"), ("A", "a2"), ("A", "a3")]


def test_read_r_lazyload_roundtrip(tmp_path):
    """A lazy-load database built like R's: gzip'd index, 4-byte length + zlib per serialized value."""
    rdata = pytest.importorskip("rdata")
    import numpy as np

    novels = {"emma": ["EMMA", "", "Emma Woodhouse, handsome, clever"], "persuasion": ["Persuasion", "£5"]}
    blob, variables = b"", {}
    for name, lines in novels.items():
        rdata.write_rds(tmp_path / "value.rds", np.array(lines), compression=None)
        raw = (tmp_path / "value.rds").read_bytes()
        entry = struct.pack(">i", len(raw)) + zlib.compress(raw)
        variables[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(tmp_path / "Rdata.rdx", {"variables": variables, "references": {}, "compressed": True})
    values = read_r_lazyload(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    assert {k: list(v) for k, v in values.items()} == novels


def test_atomic_directory_replaces_or_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:  # ours (it carries our marker): replaced
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new.txt"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(NotOurs, match=r"theirs holds files hf-patch did not write \(notes.txt\)"):
        with atomic_directory(tmp_path / "theirs") as tmp:
            pytest.fail("refused before the block")
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- prepare_books offline

FAKE_SHAKESPEARE = {"Hamlet": "HAMLET\n\nHam.\nTo be, or not to be.\n\n" * 40, "Sonnets": "Shall I compare thee\n\n" * 30}
FAKE_AUSTEN = {title: f"{title}\n\nElizabeth walked.\n\n" * 50 for title in books.AUSTEN_TITLES.values()}


@pytest.fixture
def fake_fetch(monkeypatch):
    """Replace the downloads by small in-memory books; count the calls."""
    calls = []
    monkeypatch.setattr(books, "fetch_shakespeare", lambda work: calls.append("s") or dict(FAKE_SHAKESPEARE))
    monkeypatch.setattr(books, "fetch_austen", lambda work: calls.append("a") or dict(FAKE_AUSTEN))
    return calls


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_books_offline_splits_and_idempotence(tmp_path, fake_fetch):
    paths = prepare_books(tmp_path / "books")
    assert set(paths) == {"calibration", "evaluation"}
    calibration, evaluation = _records(paths["calibration"]), _records(paths["evaluation"])
    eval_sources = {r["source"] for r in evaluation}
    assert eval_sources == set(books.EVALUATION_BOOKS)
    assert not eval_sources & {r["source"] for r in calibration}
    assert {r["source"] for r in calibration} == set(FAKE_SHAKESPEARE) | set(FAKE_AUSTEN) - eval_sources
    assert all(0 < len(r["text"]) <= books.PASSAGE_CHARS for r in calibration + evaluation)
    readme = json.loads((tmp_path / "books" / "README.json").read_text())
    assert readme["splits"]["evaluation"]["passages"] == len(evaluation)
    assert readme["splits"]["calibration"]["characters"] == sum(len(r["text"]) for r in calibration)
    assert fake_fetch == ["s", "a"]
    assert prepare_books(tmp_path / "books") == paths and fake_fetch == ["s", "a"]  # cached: no download
    prepare_books(tmp_path / "books", force=True)
    assert fake_fetch == ["s", "a", "s", "a"]


def test_books_source_through_iter_texts(tmp_path, monkeypatch, fake_fetch):
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path))
    texts = list(iter_texts("books:evaluation"))
    assert (tmp_path / "data" / "books" / "evaluation.jsonl").is_file()
    assert len(texts) == len(_records(tmp_path / "data" / "books" / "evaluation.jsonl"))
    assert "Elizabeth walked." in texts[0]
    with pytest.raises(ValueError, match="books:calibration"):
        list(iter_texts("books:training"))


def test_missing_tools_give_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv(books.AUSTEN_DEB_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on PATH
    with pytest.raises(RuntimeError, match=f"apt-get is not installed.*{books.AUSTEN_DEB_ENV}"):
        books.fetch_austen(tmp_path)
    monkeypatch.setenv(books.AUSTEN_DEB_ENV, str(tmp_path / "missing.deb"))
    with pytest.raises(FileNotFoundError, match="missing.deb"):
        books.fetch_austen(tmp_path)


# ---------------------------------------------------------------- iter_texts over sources

@pytest.fixture
def text_files(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("First paragraph,\nstill first.\n\nSecond paragraph.\n")
    (tmp_path / "txt" / "b.txt").write_text("Third.\n")
    rows = [{"text": "alpha", "n": 1}, {"text": "", "n": 2}, {"text": "beta", "n": 3}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.csv").write_text("n,body\n1,gamma\n2,delta\n")
    return tmp_path


@pytest.mark.parametrize("streaming", [True, False])
def test_iter_texts_local_files(text_files, streaming):
    def stripped(source):  # `datasets` keeps the newlines around .txt paragraphs
        return [t.strip() for t in iter_texts(source, streaming=streaming)]

    assert stripped(text_files / "txt" / "a.txt") == ["First paragraph,\nstill first.", "Second paragraph."]
    assert stripped(text_files / "txt") == [  # a directory: all its files, sorted
        "First paragraph,\nstill first.", "Second paragraph.", "Third."]
    assert list(iter_texts(str(text_files / "rows.jsonl"), streaming=streaming)) == ["alpha", "beta"]  # "" skipped
    assert list(iter_texts(text_files / "rows.parquet", streaming=streaming)) == ["alpha", "beta"]
    assert list(iter_texts(text_files / "rows.csv", text_column="body", streaming=streaming)) == ["gamma", "delta"]


def test_iter_texts_in_memory():
    ds = datasets.Dataset.from_dict({"text": ["a", None, "b"], "label": [0, 1, 2]})
    assert list(iter_texts(ds)) == ["a", "b"]
    assert list(iter_texts(ds.to_iterable_dataset())) == ["a", "b"]
    both = datasets.DatasetDict({"train": ds, "test": ds.select([2])})
    assert list(iter_texts(both, split="test")) == ["b"]
    assert list(iter_texts(both)) == ["a", "b"]  # "train" by default
    assert load_text_dataset(ds) is ds


def test_iter_texts_errors(text_files):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_texts(str(text_files / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_texts("./missing_dir"))
    with pytest.raises(ValueError, match=r"no column 'text'.*\['n', 'body'\]"):
        list(iter_texts(text_files / "rows.csv"))
    with pytest.raises(ValueError, match=r"no column 'body'.*'text'"):
        list(iter_texts(text_files / "rows.jsonl", text_column="body"))
    with pytest.raises(TypeError, match="holds int"):
        list(iter_texts(text_files / "rows.jsonl", text_column="n"))
    with pytest.raises(ValueError, match=r"unknown split 'test'.*\['train'\]"):
        list(iter_texts(text_files / "rows.jsonl", split="test"))
    two = datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["x"]}),
                                "b": datasets.Dataset.from_dict({"text": ["y"]})})
    with pytest.raises(ValueError, match=r"several splits \['a', 'b'\]"):
        list(iter_texts(two))
    with pytest.raises(ValueError, match="mixes file types"):
        list(iter_texts(text_files))
    (text_files / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.md'"):
        list(iter_texts(text_files / "notes.md"))
    with pytest.raises(TypeError, match="got int"):
        list(iter_texts(3))


# ---------------------------------------------------------------- the real corpus

@pytest.mark.network
def test_prepare_books_for_real(tmp_path):
    paths = prepare_books(tmp_path / "books")
    calibration, evaluation = _records(paths["calibration"]), _records(paths["evaluation"])
    cal_sources, eval_sources = {r["source"] for r in calibration}, {r["source"] for r in evaluation}
    assert eval_sources == {"Persuasion", "Northanger Abbey"}
    assert not cal_sources & eval_sources
    assert {"Hamlet", "Pride and Prejudice", "Emma"} <= cal_sources and len(cal_sources) > 40
    assert any("To be, or not to be" in r["text"] for r in calibration if r["source"] == "Hamlet")
    assert any("Elizabeth" in r["text"] for r in calibration if r["source"] == "Pride and Prejudice")
    assert any("Elizabeth" in r["text"] for r in evaluation) and any("Catherine Morland" in r["text"] for r in evaluation)
    assert sum(len(r["text"]) for r in evaluation) > 500_000 and sum(len(r["text"]) for r in calibration) > 5_000_000
    assert not any("PROJECT GUTENBERG" in r["text"].upper() for r in calibration + evaluation)
