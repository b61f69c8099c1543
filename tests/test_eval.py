"""lm-eval hooks: task preparation, the `hf-loki` model, `hf-patch eval` (lm-eval's CLI) and `hf-patch compare`.

Offline on CPU: a tiny random-weight Llama with a byte-level BPE tokenizer trained here, and tiny task files
written from synthetic book text and synthetic BIG-bench JSON into a temporary `$HF_PATCH_CACHE`.
"""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from hf_patch.eval import prepare  # noqa: E402

STORY = (
    "Anne walked to the garden before breakfast. The garden was quiet, and the roses were wet with rain. "
    "She thought of the letter from Captain Wentworth and of the long years since Lyme. Her sister laughed "
    "at the window, but Anne did not answer. Mary came down the stairs with a basket of apples. They spoke of "
    "the weather, of the apples, and of the carriage that was late again. At noon the carriage came at last, "
    "and the horses were tired from the road. Anne smiled at her sister and went back to the apples."
)
PASSAGES = [{"text": STORY, "source": "Synthetic"}, {"text": STORY.replace("Anne", "Emma"), "source": "Other"}]
WINOWHY = {
    "name": "winowhy", "task_prefix": "Pronouns.\n", "example_input_prefix": "\n",
    "example_output_prefix": "\nThe above reasoning is ", "append_choices_to_input": False,
    "examples": [
        {"input": f"Sentence {i}: the cup fell off the table because it was tilted.",
         "target_scores": {"correct": i % 2, "incorrect": 1 - i % 2}} for i in range(8)
    ] + [{"input": "a tie", "target_scores": {"correct": 1, "incorrect": 1}}],
}
GOAL_STEP = {  # a task made of subtasks, as goal_step_wikihow is
    "": {"name": "goal_step_wikihow"},
    "step_inference": {"name": "step_inference", "examples": [
        {"input": f"The most reasonable step of 'Task {i}' is ",
         "target_scores": {"Boil water": int(i == 0), "Read a map": int(i != 0), "Sing": 0}} for i in range(4)]},
}


# ---------------------------------------------------------------- task preparation


def test_cloze_targets_are_content_words_seen_in_the_context():
    import re

    # only the last sentence ends on a content word seen in its context (the fewest sentences of 30+ words):
    # the final "apples" (seen two sentences earlier); not the first "apples", nor "again", "road", "Lyme"
    assert [w for _, w in prepare.cloze_candidates(STORY, min_context_words=20)] == []  # context too short
    pairs = list(prepare.cloze_candidates(STORY, min_context_words=30))
    assert [w for _, w in pairs] == ["apples"]
    for context, word in pairs:
        start = STORY.index(context)
        assert start == 0 or STORY[start - 2:start] == ". "  # whole sentences
        assert len(context.split()) >= 30 and re.search(rf"\b{word}\b", context)
        assert STORY[start + len(context):].startswith(" " + word)


def test_cloze_records_are_deterministic_and_capped():
    a = prepare.cloze_records(PASSAGES, n=3, min_context_words=30)
    b = prepare.cloze_records(PASSAGES, n=3, min_context_words=30)
    assert a == b and len(a) == 2  # one candidate per passage
    assert all(r["target"].startswith(" ") and r["source"] in ("Synthetic", "Other") for r in a)
    with pytest.raises(ValueError, match="no cloze candidates"):
        prepare.cloze_records(PASSAGES, n=3, min_context_words=10_000)


def _fake_sdist(path: Path, tasks: dict[str, dict[str, dict]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/README.md", b"not a task")
        add("bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json", b"{}")
        for task, subtasks in tasks.items():
            for sub, data in subtasks.items():
                member = f"{task}/{sub}/task.json" if sub else f"{task}/task.json"
                add(f"bigbench-1.0.0/bigbench/benchmark_tasks/{member}", json.dumps(data).encode())
    return path


def test_bigbench_extraction_and_formatting(tmp_path):
    sdist = _fake_sdist(tmp_path / "bb.tar.gz", {"winowhy": {"": WINOWHY}, "goal_step_wikihow": GOAL_STEP})
    found = prepare.read_bigbench_tasks(sdist, ["winowhy", "goal_step_wikihow"])
    assert set(found) == {"winowhy", "goal_step_wikihow"} and set(found["goal_step_wikihow"]) == {"", "step_inference"}

    wino = prepare.bigbench_records("winowhy", found["winowhy"])
    assert len(wino) == 8  # the tied example is skipped
    first = next(r for r in wino if "Sentence 0:" in r["query"])
    assert first["query"] == ("Pronouns.\n\nSentence 0: the cup fell off the table because it was tilted."
                              "\nThe above reasoning is ")
    assert first["choices"][first["gold"]] == "incorrect"

    steps = prepare.bigbench_records("goal_step_wikihow", found["goal_step_wikihow"])
    assert len(steps) == 4 and {r["subtask"] for r in steps} == {"step_inference"}
    r0 = next(r for r in steps if "'Task 0'" in r["query"])
    assert r0["choices"][r0["gold"]] == "Boil water"
    assert r0["query"].startswith("Q: The most reasonable step of 'Task 0' is \n  choice: ")  # choices appended
    assert r0["query"].endswith("\nA: ") and sorted(r0["query"].count(c) for c in r0["choices"]) == [1, 1, 1]
    assert steps == prepare.bigbench_records("goal_step_wikihow", found["goal_step_wikihow"])  # deterministic

    with pytest.raises(ValueError, match="strategyqa"):
        prepare.read_bigbench_tasks(sdist, ["winowhy", "strategyqa"])


def test_withheld_bigbench_sdist_fails_first_and_says_what_to_do(tmp_path, monkeypatch):
    """An index that serves no bigbench==1.0.0 (most now list only 0.0.1): a FileNotFoundError naming the way out,
    raised before any task file is written; a local sdist given instead is used as it is."""
    import subprocess

    no_such = "ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from versions: 0.0.1)"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", no_such))
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("hf_patch.data.books.prepare_books", lambda *a, **k: pytest.fail("books before the sdist"))
    with pytest.raises(FileNotFoundError, match=r"bigbench-1\.0\.0\.tar\.gz.*from versions: 0\.0\.1.*"
                                                r"prepare-tasks --only bigbench --bigbench-sdist PATH.*BIG-bench repository"):
        prepare.prepare_tasks(["books", "bigbench"])
    assert not prepare.tasks_dir().exists()
    sdist = _fake_sdist(tmp_path / "local.tar.gz", {"winowhy": {"": WINOWHY}})
    assert prepare.fetch_bigbench_sdist(sdist) == sdist


# ---------------------------------------------------------------- a tiny model and tiny tasks


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer Llama (GQA) and a byte-level BPE tokenizer, saved like any hub checkpoint."""
    from loki_helpers import byte_level_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_level_tokenizer([STORY] * 4, vocab_size=400)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=0, bos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_basis(tmp_path_factory, tiny_model_dir) -> Path:
    from loki_helpers import random_basis

    return random_basis(layers=2, heads=2, dim=16, rotary="pre").save(tmp_path_factory.mktemp("basis") / "pre")


def _winowhy_records(tmp_path: Path) -> list[dict]:
    """The records of task `bigbench_winowhy` built from the synthetic WINOWHY through a synthetic sdist."""
    sdist = _fake_sdist(tmp_path / "bb.tar.gz", {"winowhy": {"": WINOWHY}})
    return prepare.bigbench_records("winowhy", prepare.read_bigbench_tasks(sdist, ["winowhy"])["winowhy"])


@pytest.fixture()
def local_tasks(tmp_path, monkeypatch) -> Path:
    """Tiny task files in a temporary $HF_PATCH_CACHE/tasks, built by the real preparation functions."""
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path / "cache"))
    prepare.write_tasks({
        "books_ppl": prepare.books_ppl_records(PASSAGES),
        "book_cloze": prepare.cloze_records(PASSAGES, n=4, min_context_words=30),
        "bigbench_winowhy": _winowhy_records(tmp_path),
    })
    return prepare.tasks_dir()


def _requests(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


PAIRS = [(STORY[:200], " garden"), (STORY[:90], " rain"), ("Anne", " walked"), (STORY[:300], " apples.")]


def test_hf_loki_full_attention_matches_lm_eval_hf(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    from hf_patch.eval.lm_eval_model import LokiHFLM

    args = dict(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2)
    ours = [ll for ll, _ in LokiHFLM(**args).loglikelihood(_requests(PAIRS))]
    reference = [ll for ll, _ in HFLM(**args).loglikelihood(_requests(PAIRS))]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference), rtol=0, atol=1e-5)


def test_hf_loki_patches_and_checks_arguments(tiny_model_dir, tiny_basis):
    from hf_patch.eval.lm_eval_model import LokiHFLM

    args = dict(pretrained=str(tiny_model_dir), dtype="float32", device="cpu")
    full = torch.tensor([ll for ll, _ in LokiHFLM(**args).loglikelihood(_requests(PAIRS))])
    # keeping every token with all dims is exact attention
    exact = LokiHFLM(**args, basis=str(tiny_basis), d_frac=1.0, k_frac=1.0, rotary="pre")
    torch.testing.assert_close(torch.tensor([ll for ll, _ in exact.loglikelihood(_requests(PAIRS))]), full,
                               rtol=0, atol=1e-4)
    # a real budget changes the scores, the same way whatever the batch size (padding must not leak in)
    from loki_helpers import PLAIN  # the tiny model sees few keys: nothing protected, no dense layer

    sparse = [torch.tensor([ll for ll, _ in LokiHFLM(**args, **PLAIN, basis=str(tiny_basis), d_frac=0.25, k_frac=0.25,
                                                         batch_size=b).loglikelihood(_requests(PAIRS))])
              for b in (1, 4)]
    torch.testing.assert_close(sparse[0], sparse[1], rtol=0, atol=1e-4)
    assert (sparse[0] - full).abs().max() > 1e-3
    model = LokiHFLM(**args, basis=str(tiny_basis), k_frac=0.5)
    assert model.get_model_info()["loki"]["k_frac"] == 0.5 and model.get_model_info()["loki"]["mode"] == "all"

    with pytest.raises(ValueError, match="calibrated on pre-RoPE keys"):
        LokiHFLM(**args, basis=str(tiny_basis), rotary="post")
    with pytest.raises(ValueError, match="without a basis"):
        LokiHFLM(**args, rotary="pre")


def test_hf_loki_model_args_reach_the_layers(tiny_model_dir, tiny_basis):
    """Every `LokiSettings` field is a model arg, parsed from lm-eval's `--model_args` string: k_tokens reaches each
    layer's budget and the recorded settings; with k_frac = 1 and k_tokens above every request's length the
    scores are full attention's, below it they are not."""
    from lm_eval.utils import simple_parse_args_string

    from hf_patch import loki_settings
    from hf_patch.eval.lm_eval_model import LokiHFLM
    from hf_patch.loki.arch import loki_layers

    args = dict(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=2)
    full = torch.tensor([ll for ll, _ in LokiHFLM(**args).loglikelihood(_requests(PAIRS))])
    scores = {}
    for n in (1024, 8):
        model_args = simple_parse_args_string(f"basis={tiny_basis},d_frac=0.25,k_frac=1,k_tokens={n},k_rule=row,"
                                              "sink_tokens=0,recent_tokens=0,dense_layers=0")
        lm = LokiHFLM(**args, **model_args)
        assert loki_settings(lm.model)["k_tokens"] == n and lm.get_model_info()["loki"]["k_tokens"] == n
        assert [layer.budget.k_tokens for layer in loki_layers(lm.model)] == [n, n]
        scores[n] = torch.tensor([ll for ll, _ in lm.loglikelihood(_requests(PAIRS))])
    torch.testing.assert_close(scores[1024], full, rtol=0, atol=1e-4)
    assert (scores[8] - full).abs().max() > 1e-3


def test_compare_hands_hf_loki_the_whole_setting():
    """A compare setting becomes hf-loki model args with patch_loki's defaults and the config's mode filled in,
    rotary and basis; k_tokens only when set, so that the cache keys of earlier settings stay what they were."""
    from hf_patch.app import compare
    from hf_patch.loki.settings import LmEvalLoki

    plain = compare.model_args(compare.applied_setting({"mode": "all"}, {"k_frac": 0.25}), Path("b"))
    assert plain == {"d_frac": 0.25, "k_frac": 0.25, "mode": "all", "d_policy": "uniform", "gqa_select": "query",
                     "cuda_graph": False, "k_rule": "paper", "min_tokens": 0, "sink_tokens": 4, "recent_tokens": 64,
                     "dense_layers": 2, "rotary": "pre", "basis": "b"}
    capped = compare.model_args(compare.applied_setting({"mode": "decode"}, {"k_frac": 1, "k_tokens": 256}), Path("b"))
    assert capped == {**plain, "k_frac": 1.0, "k_tokens": 256, "mode": "decode"}
    assert LmEvalLoki.from_dict(capped).patch_settings().budget().k_tokens == 256  # what hf-loki rebuilds


def test_hf_loki_decode_mode_scores_continuations_as_generation_would(tiny_model_dir, tiny_basis):
    """mode=decode: context rows exact (a prefill), continuation rows after the first under Loki (decode steps):
    equal to a direct `decode_rows` pass per request, whatever the batch size; single-token answers equal full."""
    from transformers import AutoModelForCausalLM

    from hf_patch import decode_rows, patch_loki
    from hf_patch.eval.lm_eval_model import LokiHFLM

    args = dict(pretrained=str(tiny_model_dir), dtype="float32", device="cpu")
    loki = dict(basis=str(tiny_basis), d_frac=0.25, k_frac=0.25, k_rule="row", sink_tokens=1, recent_tokens=2,
                dense_layers=0, mode="decode")
    pairs = PAIRS + [(STORY[:150], " the garden was full of")]
    lms = [LokiHFLM(**args, **loki, batch_size=b) for b in (1, 3)]
    got = [torch.tensor([ll for ll, _ in lm.loglikelihood(_requests(pairs))]) for lm in lms]
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-4)
    full = torch.tensor([ll for ll, _ in LokiHFLM(**args).loglikelihood(_requests(pairs))])

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    patch_loki(model, str(tiny_basis), **{k: v for k, v in loki.items() if k != "basis"})
    expected, single = [], []
    for context, continuation in pairs:
        ctx, cont = lms[0]._encode_pair(context, continuation)  # lm-eval's own split of the tokens
        single.append(len(cont) == 1)
        with torch.no_grad(), decode_rows(model, len(ctx)):  # cont[0] is fed back as the first decode step
            logp = model(torch.tensor([ctx + cont[:-1]])).logits[0].log_softmax(-1)
        expected.append(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    torch.testing.assert_close(got[0], torch.tensor(expected), rtol=0, atol=1e-4)
    torch.testing.assert_close(got[0][single], full[single], rtol=0, atol=1e-4)  # nothing is generated
    assert (got[0] - full).abs().max() > 1e-3  # the multi-token answers read sparse attention


def test_hf_loki_scores_transnormer_models(tiny_model_dir, tiny_basis, tmp_path):
    """A TransNormer checkpoint loads through `import hf_patch` + AutoModelForCausalLM; its lm-eval scores are the
    log-probabilities of the model's own forward pass; Loki refuses it with the supported architectures."""
    import shutil

    from transformers import AutoTokenizer

    from hf_patch import TransNormerConfig, TransNormerForCausalLM
    from hf_patch.eval.lm_eval_model import LokiHFLM

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    model = TransNormerForCausalLM(TransNormerConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        initializer_range=0.3, max_position_embeddings=1024)).eval()
    model.save_pretrained(tmp_path)

    lm = LokiHFLM(pretrained=str(tmp_path), dtype="float32", device="cpu", batch_size=3)
    got = torch.tensor([ll for ll, _ in lm.loglikelihood(_requests(PAIRS))])
    expected = []
    for context, continuation in PAIRS:
        ctx, cont = tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        expected.append(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="Loki supports the architectures"):
        LokiHFLM(pretrained=str(tmp_path), dtype="float32", device="cpu", basis=str(tiny_basis))


def test_eval_cli_runs_lm_eval_with_local_tasks(tiny_model_dir, tiny_basis, local_tasks, tmp_path):
    from hf_patch.app.cli import main

    out = tmp_path / "lm_eval_out"
    args = dict(pretrained=str(tiny_model_dir), dtype="float32", basis=str(tiny_basis), k_frac=0.5, dense_layers=0)
    rc = main(["eval", "run", "--model", "hf-loki", "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
               "--tasks", "hfp_book_cloze,hfp_bigbench_winowhy,hfp_books_ppl", "--limit", "3", "--batch_size", "2",
               "--device", "cpu", "--output_path", str(out)])
    assert rc == 0
    (result_file,) = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())
    assert results["config"]["model"] == "hf-loki"
    assert results["config"]["model_args"]["basis"] == str(tiny_basis)
    assert 0.0 <= results["results"]["hfp_bigbench_winowhy"]["acc,none"] <= 1.0
    assert results["n-samples"]["hfp_book_cloze"]["effective"] == 2  # all there are
    # word perplexity as lm-eval defines it, from the rolling log-likelihoods of the same documents under the same
    # Loki settings; full attention scores them differently (the settings reached the model)
    from lm_eval.api.instance import Instance

    from hf_patch import unpatch
    from hf_patch.eval.lm_eval_model import LokiHFLM

    docs = [r["text"] for r in prepare.read_jsonl(prepare.task_file("books_ppl"))][:3]
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                for i, d in enumerate(docs)]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    lm = LokiHFLM(**args, device="cpu")
    loki = sum(lm.loglikelihood_rolling(requests))
    unpatch(lm.model)
    full = sum(lm.loglikelihood_rolling(requests))
    ppl = results["results"]["hfp_books_ppl"]["word_perplexity,none"]
    assert ppl == pytest.approx(math.exp(-loki / words), rel=1e-7)
    assert abs(math.log(ppl) + full / words) > 1e-5  # about 8e-5: random weights attend almost uniformly


def test_eval_cli_help_is_lm_evals(capsys):
    from hf_patch.app.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "run", "--help"])
    assert "--model_args" in capsys.readouterr().out


def test_include_path_merges_a_user_task_dir(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from hf_patch.app.evaluate import with_include_path
    from hf_patch.eval.prepare import TASKS_DIR

    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path / "cache"))  # no standard tasks prepared
    assert with_include_path(["run", "--tasks", "x"]) == ["run", "--tasks", "x", "--include_path", str(TASKS_DIR)]
    mine = tmp_path / "my_tasks"
    mine.mkdir()
    (mine / "mine.yaml").write_text("task: my_task\ndataset_path: json\noutput_type: loglikelihood\n"
                                    "test_split: test\ndoc_to_text: a\ndoc_to_target: b\n")
    argv = with_include_path(["run", "--include_path", str(mine), "--tasks", "my_task"])
    assert argv[:3] == ["run", "--tasks", "my_task"] and argv[3] == "--include_path"
    tasks = TaskManager(include_path=argv[4], include_defaults=False).all_tasks
    assert "my_task" in tasks and "hfp_book_cloze" in tasks
    with pytest.raises(FileNotFoundError, match="not a directory"):
        with_include_path(["--include_path", str(tmp_path / "missing")])


def test_local_task_names_do_not_shadow_lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    from hf_patch.eval.prepare import TASKS_DIR

    ours = set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
    assert {"hfp_books_ppl", "hfp_book_cloze", "hfp_bigbench_social_iqa", "hfp_bigbench_winowhy",
            "hfp_bigbench_strategyqa", "hfp_bigbench_goal_step_wikihow"} <= ours
    builtin = set(TaskManager(include_defaults=True, include_path=None).all_tasks)
    assert not ours & builtin and {"hellaswag", "arc_easy"} <= builtin


def test_missing_task_data_says_what_to_run(tmp_path, monkeypatch):
    from hf_patch.eval.tasks.utils import load

    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf-patch prepare-tasks"):
        load("book_cloze", pretrained="ignored")


# ---------------------------------------------------------------- compare


def test_compare_tables_plots_and_resumes(tiny_model_dir, local_tasks, tmp_path, monkeypatch, saved_figures):
    import lm_eval

    from hf_patch.app import compare

    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join([STORY] * 6))
    out = tmp_path / "compare"
    cfg = {"model": str(tiny_model_dir), "device": "cpu", "batch_size": 2, "output_dir": str(out),
           "calibration": {"dataset": str(text), "num_tokens": 512, "seq_len": 128, "batch_size": 2},
           "tasks": {"hfp_bigbench_winowhy": 4, "hfp_book_cloze": 1, "hfp_books_ppl": 1},
           "settings": [{"d_frac": 0.25, "k_frac": 0.25}]}
    calls = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: calls.append(kw["tasks"][0]) or real(**kw))

    payload = compare.run_compare(cfg)
    assert len(calls) == 6 and (out / "basis-pre" / "loki_basis.json").is_file()  # calibrated on the way
    md = (out / "results.md").read_text()
    assert "| task | metric | n | full | loki d=0.25 k=0.25 | Δ |" in md
    assert "| hfp_bigbench_winowhy | acc (%) | 4 |" in md and "| hfp_books_ppl | word_perplexity | 1 |" in md
    fig = saved_figures(out / "accuracy_vs_k.png")  # one panel per task: full dashed, the setting at its k_f
    assert len(fig.axes) == len(payload["summary"]) == 3
    for ax, e in zip(fig.axes, payload["summary"]):
        scale = 1 if e["metric"] == "word_perplexity" else 100
        full, loki = ax.get_lines()
        assert ax.get_title() == f"{e['task']} (n={e['n']})" and ax.get_xlabel() == "k_f"
        assert ax.get_ylabel() == e["metric"] + ("" if scale == 1 else " (%)")
        assert list(full.get_ydata()) == [scale * e["settings"]["full"]["value"]] * 2 and full.get_linestyle() == "--"
        assert list(loki.get_xdata()) == [0.25]
        assert list(loki.get_ydata()) == [scale * e["settings"]["loki d=0.25 k=0.25"]["value"]]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "d_f=0.25"]
    summary = {e["task"]: e for e in json.loads((out / "results.json").read_text())["summary"]}
    wino = summary["hfp_bigbench_winowhy"]["settings"]
    assert wino["full"]["delta"] == 0 and wino["full"]["stderr"] is not None
    assert wino["loki d=0.25 k=0.25"]["delta"] == pytest.approx(
        wino["loki d=0.25 k=0.25"]["value"] - wino["full"]["value"])
    assert summary == {e["task"]: e for e in payload["summary"]}

    calls.clear()
    compare.run_compare(cfg)  # everything cached: nothing runs
    assert calls == []
    compare.run_compare({**cfg, "tasks": {**cfg["tasks"], "hfp_book_cloze": 2}})  # one task changed
    assert calls == ["hfp_book_cloze", "hfp_book_cloze"]
    with pytest.raises(ValueError, match=r"settings\[0\]: sink_tokens must be"):
        compare.run_compare({**cfg, "settings": [{"d_frac": 0.5, "sink_tokens": -1}]})


# ---------------------------------------------------------------- real data and model


@pytest.mark.slow
def test_smollm2_quick_compare(tmp_path, monkeypatch, smollm2_model):
    """The real SmolLM2-135M through `compare` on a few examples (a basis calibrated on the way): held-out
    perplexity is that of a trained model, the paper's bare Loki at (0.25, 0.25) changes it, every metric is a number.
    The book tasks are built from the real corpus on the way; the multiple-choice task is the synthetic winowhy
    (the real sdist is a download some indexes withhold: `test_real_bigbench_extraction` covers it).
    (Loki with d = D, k = S equalling full attention is checked on the tiny model above.)"""
    from hf_patch.config import load_config
    from hf_patch.app import compare

    monkeypatch.setattr(prepare, "tasks_dir", lambda: tmp_path / "tasks")  # the real model and corpus stay cached
    prepare.write_tasks({"bigbench_winowhy": _winowhy_records(tmp_path)})
    cfg = load_config("configs/eval/smollm2_quick.yaml")
    cfg.update(output_dir=str(tmp_path / "out"), basis={}, calibration={**cfg["calibration"], "num_tokens": 2048,
                                                                          "seq_len": 512},
               tasks={"hfp_books_ppl": 1, "hfp_book_cloze": 4, "hfp_bigbench_winowhy": 4},
               settings=[{"name": "bare", "d_frac": 0.25, "k_frac": 0.25, "sink_tokens": 0, "recent_tokens": 0,
                          "dense_layers": 0}])
    summary = {e["task"]: e["settings"] for e in compare.run_compare(cfg)["summary"]}
    assert {str(p.relative_to(tmp_path / "tasks")) for p in (tmp_path / "tasks").rglob("*.jsonl")} == {
        "books/books_ppl.jsonl", "books/book_cloze.jsonl", "bigbench/bigbench_winowhy.jsonl"}
    ppl = summary["hfp_books_ppl"]
    # full attention's word perplexity equals lm-eval's definition computed here from the model's own logits: the
    # document after a BOS token (one window: it is shorter than the model's 8192 positions), over its words
    model, tokenizer = smollm2_model
    (doc,) = [r["text"] for r in prepare.read_jsonl(prepare.task_file("books_ppl"))][:1]
    ids = tokenizer(doc)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id and len(ids) < 8192
    with torch.no_grad():
        logp = model(torch.tensor([[tokenizer.bos_token_id] + ids[:-1]])).logits[0].double().log_softmax(-1)
    loglikelihood = logp[torch.arange(len(ids)), ids].sum().item()
    assert ppl["full"]["value"] == pytest.approx(math.exp(-loglikelihood / len(re.split(r"\s+", doc))), rel=1e-4)
    assert ppl["bare"]["value"] > 1.01 * ppl["full"]["value"]
    for task in ("hfp_book_cloze", "hfp_bigbench_winowhy"):
        assert all(0 <= s["value"] <= 1 for s in summary[task].values()), task
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "accuracy_vs_k.png").is_file()


@pytest.mark.network
def test_real_bigbench_extraction(tmp_path, monkeypatch):
    """Download (once, into the real cache) and stream-extract the BIG-bench sdist: ~5 s once cached."""
    cached = prepare.cache_root() / "downloads" / prepare.BIGBENCH_SDIST
    try:
        sdist = prepare.fetch_bigbench_sdist()
    except OSError as err:  # offline, or the index withholds the sdist
        pytest.skip(f"BIG-bench sdist not available: {err}")
    assert sdist == cached
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path))
    paths = prepare.prepare_tasks(["bigbench"], bigbench_sdist=sdist)
    counts = {name: len(prepare.read_jsonl(path)) for name, path in paths.items()}
    assert counts == {"bigbench_social_iqa": 1954, "bigbench_winowhy": 2865, "bigbench_strategyqa": 2290,
                      "bigbench_goal_step_wikihow": 7053}
    strategy = prepare.read_jsonl(paths["bigbench_strategyqa"])
    assert all(r["choices"] == ["Yes", "No"] and r["query"].startswith("Q: ") for r in strategy)
