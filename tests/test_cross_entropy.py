"""Fused linear + cross entropy (hf_patch.kernels.cross_entropy) against F.cross_entropy, and the loss-only wrapper.

The Triton kernel runs compiled on a GPU and through Triton's CPU interpreter elsewhere (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU): the Triton tests draw their inputs on the CPU (seeded), move them to DEVICE
and compare against references computed on the same device.
"""
from __future__ import annotations

import pytest
import torch

from hf_patch.kernels.cross_entropy import (
    _ce_rows_torch,
    _ce_rows_triton,
    causal_lm_loss,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from hf_patch.transnormer import CausalLMWithFusedLoss, TransNormerConfig, TransNormerForCausalLM

N, C, V = 45, 12, 37  # 45 tokens in chunks of 16 (the last one short); V spans three 16-wide kernel tiles
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter elsewhere


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def problem(dtype=torch.float64, bias=True, seed=0, device="cpu"):
    """h [N, C], W [V, C], b [V] (leaves that require grad) and labels [N], drawn on the CPU, then put on ``device``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=dtype)
    w = torch.randn(V, C, generator=g, dtype=dtype) * 0.5
    b = torch.randn(V, generator=g, dtype=dtype) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 3, 20, 44]] = -100
    h, w, b = (None if t is None else t.to(device).requires_grad_() for t in (h, w, b))
    return h, w, b, y.to(device)


def loss_and_grads(fn, h, w, b, y, scale=1.0, **kwargs):
    inputs = [t for t in (h, w, b) if t is not None]
    loss = fn(h, w, y, b, **kwargs)
    grads = torch.autograd.grad(loss * scale, inputs)
    return loss.detach(), grads


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-6)])
def test_loss_and_gradients_match_the_reference(backend, dtype, tol):
    h, w, b, y = problem(dtype, device=DEVICE)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, h, w, b, y, scale=0.7, chunk_size=16, backend=backend,
                                 block=16)
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, h, w, b, y, scale=0.7, chunk_size=16)
    assert loss.dtype == ref_loss.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) < tol * abs(ref_loss.item())
    for name, got, want in zip(("h", "W", "b"), grads, ref_grads):
        assert got.dtype == want.dtype and rel(got, want) < tol, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_low_precision_logits(dtype):
    """The per-chunk step alone: the Triton kernel vs its PyTorch twin on the same low-precision logits."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, V, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (9,), generator=g)
    labels[4] = -100
    labels, scale = labels.to(DEVICE), torch.tensor([1 / 8.0], device=DEVICE)
    out = []
    for step in (_ce_rows_triton, _ce_rows_torch):
        x, loss = logits.clone(), torch.empty(9, device=DEVICE)
        step(x, labels, loss, scale, True, block=16)
        out.append((x, loss))
    (x_t, loss_t), (x_r, loss_r) = out
    assert rel(loss_t, loss_r) < 1e-6 and loss_t[4] == 0
    # one rounding to the logits' dtype each (the interpreter may round differently from PyTorch)
    assert (x_t.float() - x_r.float()).abs().max() <= 2 * torch.finfo(dtype).eps / 8
    assert torch.all(x_t[4] == 0)


def test_autocast_bf16_with_float32_master_weights():
    """bf16 matmuls, float32 loss, float32 gradients for float32 inputs (what a training step under autocast sees)."""
    h, w, b, y = problem(torch.float32, bias=False, device=DEVICE)
    results = []
    for fn, kwargs in ((fused_linear_cross_entropy, dict(chunk_size=16, backend="triton", block=16)),
                       (linear_cross_entropy_reference, dict(chunk_size=16))):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            results.append(loss_and_grads(fn, h, w, None, y, **kwargs))
    (loss, grads), (ref_loss, ref_grads) = results
    exact = loss_and_grads(linear_cross_entropy_reference, h, w, None, y)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert abs(loss - ref_loss) < 1e-5 * ref_loss and abs(loss - exact[0]) < 2e-2 * exact[0]
    for got, want, full in zip(grads, ref_grads, exact[1]):
        assert rel(got, want) < 1e-2 and rel(got, full) < 3e-2


def test_tied_embedding_gets_both_gradients():
    """W is the input embedding too: its grad is the embedding's plus the head's, as with the reference."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (3, 15), generator=g)
    labels = ids.clone()
    labels[1, :6] = -100
    mix = torch.randn(C, C, generator=g, dtype=torch.float64) / C**0.5
    grads = []
    for fn in (causal_lm_loss, None):
        emb = torch.nn.Embedding(V, C, dtype=torch.float64)
        emb.weight.data = torch.randn(V, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        hidden = torch.tanh(emb(ids) @ mix)
        if fn is None:  # the reference: shift as transformers does
            shifted = hidden[:, :-1]
            loss = linear_cross_entropy_reference(shifted, emb.weight, labels[:, 1:], chunk_size=7)
        else:
            loss = fn(hidden, emb.weight, labels, chunk_size=7)
        loss.backward()
        grads.append((loss.detach(), emb.weight.grad))
    assert abs(grads[0][0] - grads[1][0]) < 1e-12 and rel(grads[0][1], grads[1][1]) < 1e-12


def test_ignored_chunks_and_all_ignored():
    h, w, b, y = problem(torch.float32, device=DEVICE)
    y[:16] = -100  # the whole first chunk; the kernel's default tile (one 64-wide tile, partly masked)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, h, w, b, y, chunk_size=16, backend="triton")
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, h, w, b, y, chunk_size=16)
    assert abs(loss - ref_loss) < 2e-6 * ref_loss and all(rel(a, e) < 2e-6 for a, e in zip(grads, ref_grads))
    assert torch.all(grads[0][:16] == 0)
    y[:] = -100  # nothing to predict: 0, not NaN
    for backend in ("triton", "torch"):
        loss, grads = loss_and_grads(fused_linear_cross_entropy, h, w, b, y, chunk_size=16, backend=backend,
                                     block=16)
        assert loss == 0 and all(torch.all(g == 0) for g in grads)


def test_no_grad_gives_the_loss_only():
    h, w, b, y = problem(torch.float64)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y, b, chunk_size=16)
    assert abs(loss - linear_cross_entropy_reference(h, w, y, b)) < 1e-12
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, y, backend="cuda")
    for bad in (V, -1):  # outside the head's rows and not the ignore index: refused, not silently scored
        y_bad = y.clone()
        y_bad[5] = bad
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
            fused_linear_cross_entropy(h, w, y_bad, b)


@pytest.mark.parametrize("kind", ["transnormer", "llama"])
def test_wrapper_loss_and_gradients_equal_the_models_own(kind):
    from transformers import LlamaForCausalLM

    from hf_patch.transnormer.baseline import matching_llama_config

    torch.manual_seed(0)
    config = TransNormerConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48)
    lm = TransNormerForCausalLM(config) if kind == "transnormer" else LlamaForCausalLM(matching_llama_config(config, 64))
    ids = torch.randint(0, 53, (2, 19))
    labels = ids.clone()
    labels[0, :5] = -100
    results = []
    for model in (lm, CausalLMWithFusedLoss(lm, chunk_size=10)):
        lm.zero_grad()
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in lm.parameters()])))
    (own, own_grads), (fused, fused_grads) = results
    assert abs(own - fused) < 1e-5 * own and rel(fused_grads, own_grads) < 1e-5
