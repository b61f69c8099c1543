"""PCA calibration: streaming sums equal a direct PCA, pre/post RoPE, datasets input, save/load round trip."""
from __future__ import annotations

import json

import pytest
import torch
from loki_helpers import TEXTS, CharTokenizer, assert_explained_variance_figure, random_basis, tiny_model

from hf_patch import PCABasis, calibrate_pca, patch_loki
from hf_patch.data.packing import token_windows


def direct_keys(model, windows: torch.Tensor, rotary: str) -> list[torch.Tensor]:
    """All keys per layer as [N, H_kv, D], captured from a plain forward (pre: k_proj/k_norm out; post: cache)."""
    cfg = model.config
    heads, dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        if rotary == "post":
            cache = model(windows, use_cache=True).past_key_values
            return [layer.keys.transpose(1, 2).reshape(-1, heads, dim) for layer in cache.layers]
        captured = []
        hooks = [
            (getattr(layer.self_attn, "k_norm", None) or layer.self_attn.k_proj).register_forward_hook(
                lambda _m, _i, out: captured.append(out.reshape(-1, heads, dim)))
            for layer in model.model.layers
        ]
        model(windows)
        for h in hooks:
            h.remove()
        return captured


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("rotary", ["pre", "post"])
def test_streamed_pca_equals_direct_pca(arch, rotary):
    model = tiny_model(arch)
    tok = CharTokenizer()
    basis = calibrate_pca(model, tok, TEXTS, num_tokens=512, rotary=rotary, seq_len=64, batch_size=3, progress=False)
    windows = torch.stack(list(token_windows(TEXTS, tok, 64, 512)))
    assert basis.metadata["tokens"] == windows.numel() == 512
    for layer, keys in enumerate(direct_keys(model, windows, rotary)):
        k = keys.double()
        for h in range(k.shape[1]):
            cov = torch.cov(k[:, h].T, correction=0)
            ev, vec = torch.linalg.eigh(cov)
            torch.testing.assert_close(basis.eigenvalues[layer, h], ev.flip(0), rtol=1e-6, atol=1e-9)
            p = basis.components[layer, h].double()
            # same subspaces: the projector onto the top 4 components agrees (signs may differ)
            top = vec.flip(1)[:, :4]
            torch.testing.assert_close(p[:, :4] @ p[:, :4].T, top @ top.T, atol=1e-4, rtol=0)
            torch.testing.assert_close(basis.mean[layer, h].double(), k[:, h].mean(0), atol=1e-5, rtol=1e-5)
    assert basis.rotary == rotary


def test_pre_and_post_rope_bases_differ():
    model = tiny_model("llama")
    tok = CharTokenizer()
    pre = calibrate_pca(model, tok, TEXTS, num_tokens=512, rotary="pre", seq_len=64, progress=False)
    post = calibrate_pca(model, tok, TEXTS, num_tokens=512, rotary="post", seq_len=64, progress=False)
    assert not torch.allclose(pre.eigenvalues, post.eigenvalues, rtol=1e-3)


def test_calibrates_from_a_datasets_dataset_and_stops_at_budget():
    from datasets import Dataset

    model = tiny_model("mistral")
    data = Dataset.from_dict({"text": TEXTS})
    basis = calibrate_pca(model, CharTokenizer(), data, num_tokens=256, seq_len=64, batch_size=2, progress=False)
    assert basis.metadata["tokens"] == 256
    assert basis.components.shape == (2, 2, 16, 16)


def test_calibration_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="rotary must be one of"):
        calibrate_pca(model, CharTokenizer(), TEXTS, rotary="mid", progress=False)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibrate_pca(model, CharTokenizer(), ["short"], num_tokens=128, seq_len=64, progress=False)
    patch_loki(model, random_basis())
    with pytest.raises(ValueError, match="unpatch"):
        calibrate_pca(model, CharTokenizer(), TEXTS, progress=False)


def test_save_load_round_trip(tmp_path):
    basis = random_basis(layers=3, heads=2, dim=8)
    basis.metadata.update(tokens=123, dataset="books:calibration")
    basis.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "loki_basis.json").read_text())
    assert meta["num_layers"] == 3 and meta["rotary"] == "pre" and len(meta["rank_at_90"]) == 3
    loaded = PCABasis.load(tmp_path / "b")
    assert torch.equal(loaded.components, basis.components)
    assert torch.equal(loaded.eigenvalues, basis.eigenvalues)
    assert loaded.metadata == basis.metadata


def test_explained_variance_and_rank():
    basis = random_basis(layers=1, heads=1, dim=4)
    basis.eigenvalues[0, 0] = torch.tensor([6.0, 2.0, 1.0, 1.0])
    torch.testing.assert_close(basis.explained_variance()[0, 0], torch.tensor([0.6, 0.8, 0.9, 1.0]))
    assert basis.rank_at(0.9).item() == 3
    assert basis.rank_at(0.85).item() == 3
    assert basis.rank_at(0.5).item() == 1


def test_basis_shape_errors():
    with pytest.raises(ValueError, match=r"components must be \[L, H_kv, D, D\]"):
        PCABasis(torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="rotary"):
        PCABasis(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), {"rotary": "sideways"})


def test_plot_explained_variance_draws_the_bases(tmp_path, saved_figures):
    from hf_patch.app.plots import plot_explained_variance

    bases = {"pre": random_basis(layers=3), "post": random_basis(layers=3, seed=2)}
    path = plot_explained_variance(bases, tmp_path / "ev.png")
    assert path == tmp_path / "ev.png"
    assert_explained_variance_figure(saved_figures(path), bases)
