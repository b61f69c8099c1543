"""Bad input is caught before the expensive work, said in one line that names the field or file and the fix,
never silently wrong (issue 16). CLI errors are `hf-patch: error: ...` with exit status 2, before any model loads."""
from __future__ import annotations

import json
import re
import warnings

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
