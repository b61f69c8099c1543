"""End to end: the `hf-patch` commands on a local checkpoint and text files, and Loki on the real SmolLM2-135M."""
from __future__ import annotations

import json

import pytest
import torch
from loki_helpers import TEXTS, assert_explained_variance_figure, reference_loki

import hf_patch
from hf_patch.app.cli import main as cli
from hf_patch.eval.perplexity import perplexity


@pytest.fixture
def byte_checkpoint(tmp_path):
    """A random 2-layer Qwen2 (GQA) saved with a byte-level BPE tokenizer, plus a local jsonl corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=0)
    model_dir = tmp_path / "model"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return model_dir, corpus


def test_calibrate_and_perplexity_commands(byte_checkpoint, tmp_path, capsys, saved_figures):
    model_dir, corpus = byte_checkpoint
    config = tmp_path / "calibrate.yaml"
    config.write_text(f"model: {model_dir}\ndataset: {corpus}\nnum_tokens: 1024\nseq_len: 128\nbatch_size: 2\n"
                      f"rotary: post\noutput: {tmp_path / 'basis'}\ndevice: cpu\n")
    assert cli(["calibrate", "--config", str(config)]) == 0
    assert "post-RoPE basis, 1024 tokens: rank@90%" in capsys.readouterr().out
    basis = hf_patch.PCABasis.load(tmp_path / "basis")
    assert basis.components.shape == (2, 2, 16, 16) and basis.rotary == "post"
    assert_explained_variance_figure(saved_figures(tmp_path / "basis" / "explained_variance.png"), {"post-RoPE": basis})

    common = ["--model", str(model_dir), "--dataset", str(corpus), "--seq-len", "128", "--max-tokens", "1024",
              "--device", "cpu"]
    assert cli(["perplexity", *common]) == 0
    full = json.loads(capsys.readouterr().out)
    assert cli(["perplexity", *common, "--basis", str(tmp_path / "basis"), "--d-frac", "1", "--k-frac", "1"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["tokens"] == full["tokens"] == 8 * 127
    assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-5)


def run_main_job(checkpoint, out, evaluation: str, settings: str) -> None:
    """`hf-patch main` on the byte checkpoint and corpus: `evaluation` and `settings` are YAML blocks ({corpus}
    stands for the corpus file)."""
    model_dir, corpus = checkpoint
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        f"model: {model_dir}\ndevice: cpu\nthreads: 1\noutput_dir: {out}\n"
        f"calibration: {{dataset: {corpus}, num_tokens: 1024, seq_len: 128, batch_size: 2}}\n"
        + f"evaluation:\n{evaluation}settings:\n{settings}".replace("{corpus}", str(corpus)))
    assert cli(["main", "--config", str(config)]) == 0


def test_main_job_writes_table_json_and_plot(byte_checkpoint, tmp_path, saved_figures):
    out = tmp_path / "main"
    run_main_job(byte_checkpoint, out,
                 "  all: {dataset: {corpus}, seq_len: 128, max_tokens: 512}\n"
                 "  decode: {dataset: {corpus}, prefix: 96, new_tokens: 31, windows: 2}\n",
                 "  - {rotary: pre, d_frac: 1.0, k_frac: 1.0, sink_tokens: 2}\n"
                 "  - {rotary: post, d_frac: 0.25, k_frac: 0.25, d_policy: variance, sink_tokens: 0, "
                 "recent_tokens: 0, dense_layers: 0}\n"
                 "  - {name: mine, k_frac: 0.25, recent_tokens: 8, dense_layers: 1}\n")
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["setting"] for r in results] == [
        "full", "loki d=1 k=1 sink_tokens=2",
        "loki d=0.25 k=0.25 d_policy=variance sink_tokens=0 recent_tokens=0 dense_layers=0 post-RoPE", "mine"]
    for evaluation, tokens in (("all", 4 * 127), ("decode", 2 * 31)):
        assert results[0][evaluation]["tokens"] == tokens
        assert results[1][evaluation]["ppl"] == pytest.approx(results[0][evaluation]["ppl"], rel=1e-5)
        assert results[2][evaluation]["ppl"] != pytest.approx(results[0][evaluation]["ppl"], rel=1e-4)
    assert results[3]["k_rule"] == "paper" and results[3]["dense_layers"] == [0] and results[3]["d_frac"] == 0.25
    assert results[3]["cost"] == pytest.approx((1 + 0.375) / 2)
    table = (out / "results.md").read_text()
    assert "| setting | read cost | decode-equivalent ppl | vs full | mode-all ppl | vs full |" in table
    assert "| loki d=0.25 k=0.25 d_policy=variance sink_tokens=0 recent_tokens=0 dense_layers=0 post-RoPE | 0.375 |" in table
    ax, = saved_figures(out / "perplexity.png").axes  # one bar group per setting, one bar per evaluation
    assert [c.get_label() for c in ax.containers] == [
        f"{title} (full {results[0][key]['ppl']:.2f})" for key, title in (("decode", "decode-equivalent ppl"),
                                                                         ("all", "mode-all ppl"))]
    for bars, key in zip(ax.containers, ("decode", "all")):
        assert [bar.get_height() for bar in bars] == pytest.approx(
            [100 * (r[key]["ppl"] / results[0][key]["ppl"] - 1) for r in results[1:]], rel=1e-12)
    assert [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()] == [
        f"{r['setting']} cost {r['cost']:.3f}" for r in results[1:]]
    bases = {f"{r}-RoPE": hf_patch.PCABasis.load(out / f"basis-{r}") for r in ("post", "pre")}
    assert_explained_variance_figure(saved_figures(out / "explained_variance.png"), bases)
    assert_explained_variance_figure(saved_figures(out / "basis-pre" / "explained_variance.png"),
                                     {"pre-RoPE": bases["pre-RoPE"]})


def test_unknown_config_keys_fail_loudly(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\nnum_token: 5\n")
    assert cli(["calibrate", "--config", str(config)]) == 2
    assert "unknown keys ['num_token']" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_calibrate_patch_generate(smollm2_model):
    model, tokenizer = smollm2_model
    basis = hf_patch.calibrate_pca(model, tokenizer, TEXTS, num_tokens=1024, seq_len=256, progress=False)
    assert basis.components.shape == (30, 3, 64, 64)
    assert (basis.rank_at(0.9) < 64).all()  # real keys are low-rank

    prompts = ["The capital of France is", "Once upon a time, in a small village,"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt = inputs.input_ids.shape[1]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    try:
        reference = model.generate(**inputs, **kwargs)
        hf_patch.patch_loki(model, basis, d_frac=1.0, k_frac=1.0, mode="decode")
        assert torch.equal(model.generate(**inputs, **kwargs), reference)
        # the bare algorithm (row rule, nothing protected, every layer): the prompt's keys number below the default
        # protection (4 sink + 64 recent), which would keep them all
        bare = dict(k_rule="row", sink_tokens=0, recent_tokens=0, dense_layers=0)
        hf_patch.patch_loki(model, basis, d_frac=0.5, k_frac=0.5, mode="decode", **bare)
        sparse = model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=True)
        assert not torch.equal(sparse.sequences, reference)
        # each step's logits equal a float64 Loki by definition run teacher-forced on the generated sequence:
        # the prompt's rows exact (mode "decode" prefills exactly), each generated token's row Loki
        hf_patch.unpatch(model)
        mask = torch.cat([inputs.attention_mask, torch.ones(2, 12, dtype=torch.int64)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers a left-padded row
        reference_loki(model, basis, 0.5, 0.5, loki_from=prompt)
        with torch.no_grad():
            expected = model(sparse.sequences, attention_mask=mask, position_ids=positions).logits[:, prompt - 1: -1]
        reference_loki(model, basis, 0.5, 0.5)
        # (|logits| reach 34; a float32 run of the model gives them within 1e-4, a position off changes them by 2)
        torch.testing.assert_close(torch.stack(sparse.logits, 1), expected, atol=1e-3, rtol=0)

        # mode "all": every row of 128-token windows by Loki, the same reference on every row
        expected = perplexity(model, tokenizer, TEXTS, seq_len=128, max_tokens=512, progress=False)["ppl"]
        model.set_attn_implementation("sdpa")
        hf_patch.patch_loki(model, basis, d_frac=0.5, k_frac=0.5, mode="all", **bare)
        loki = perplexity(model, tokenizer, TEXTS, seq_len=128, max_tokens=512, progress=False)["ppl"]
        assert loki == pytest.approx(expected, rel=1e-4)
    finally:
        if hf_patch.is_patched(model):
            hf_patch.unpatch(model)
        model.set_attn_implementation("sdpa")


def test_main_job_reads_at_several_prefix_lengths(byte_checkpoint, tmp_path):
    out = tmp_path / "long"
    run_main_job(byte_checkpoint, out, "  decode: {dataset: {corpus}, prefix: [32, 80], new_tokens: 15, windows: 1}\n",
                 "  - {name: plain, k_frac: 0.25, sink_tokens: 0, recent_tokens: 0, dense_layers: 0}\n"
                 "  - {name: capped, k_frac: 1, k_tokens: 40, sink_tokens: 0, recent_tokens: 0, dense_layers: 0}\n")
    full, plain, capped = json.loads((out / "results.json").read_text())["results"]
    assert [k for k in full if k.startswith("decode")] == ["decode@32", "decode@80"]
    assert full["decode@80"]["tokens"] == plain["decode@32"]["tokens"] == 15
    assert plain["decode@80"]["ppl"] != pytest.approx(full["decode@80"]["ppl"], rel=1e-4)
    # a token budget of 40 keys: the rows after a prefix of 32 see at most 47 keys, after 80 at least 81
    assert capped["k_tokens"] == 40 and capped["cost_context"] == 80 + 15
    assert capped["decode@80"]["ppl"] != pytest.approx(full["decode@80"]["ppl"], rel=1e-4)
    table = (out / "results.md").read_text()
    assert "decode-equivalent ppl (prefix 80) | vs full |" in table
    assert f"| capped | {0.125 + 40 / 95:.3f} at 95 keys |" in table
