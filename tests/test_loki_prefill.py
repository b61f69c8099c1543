"""Loki prefill kernels (mode "all": hf_patch/kernels/loki/prefill.py) and their glue (hf_patch/loki/prefill.py):
Triton (interpreter on the CPU) against their PyTorch reference (hf_patch/kernels/loki/prefill_naive.py, the
library's dense path) and a float64 reference with the earliest-position tie rule, protected sink/recent keys
included."""
from __future__ import annotations

import pytest
import torch

from hf_patch.kernels.loki.prefill import LokiPrefillConfig, approx_width, loki_prefill_attention, prefill_thresholds
from hf_patch.kernels.loki.prefill_naive import loki_prefill_attention_torch
from hf_patch.loki import prefill as glue
from hf_patch.loki.arch import loki_layers
from hf_patch.loki.attention import LokiLayer, loki_attention_dense, visible_keys
from hf_patch.loki.budget import Budget
from hf_patch.loki.prefill import key_ranges, keys_per_row, prepare, visible_counts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter elsewhere
SMALL = LokiPrefillConfig(block_m=16, block_n=16)  # several row blocks and key tiles at interpreter sizes
BISECT = LokiPrefillConfig(block_m=16, block_n=32, max_interp=1)  # order-key bisection from the second pass
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(x, ref):
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def make_mask(b, t, s, pad):
    """Bool [B, 1, T, S] as Transformers' sdpa_mask builds it, and the ranges it stands for (None: causal)."""
    start = torch.zeros(b, dtype=torch.int64)
    end = torch.full((b,), s)
    if pad == "left":
        start[0], start[-1] = 5, s - t + t // 3  # rows before the start see nothing
    elif pad == "right":
        end[0] = s - 7
    pos = torch.arange(s)
    rows = torch.arange(t)[:, None] + (s - t)
    vis = (pos >= start[:, None, None]) & (pos < end[:, None, None]) & (pos <= rows)
    return vis[:, None].to(DEVICE), (None if pad == "none" else (start, end))


def make_layer(hkv, dh, dims, budget, select, exact_basis=False, seed=0):
    """A LokiLayer in mode "all"; budget: a Budget or a k_frac; exact_basis: signed permutations (no rounding)."""
    gen = torch.Generator().manual_seed(seed)
    if exact_basis:
        basis = torch.stack([torch.eye(dh)[torch.randperm(dh, generator=gen)] for _ in range(hkv)])
        basis = basis * (torch.randint(0, 2, (hkv, 1, dh), generator=gen) * 2 - 1)
    else:
        basis = torch.linalg.qr(torch.randn(hkv, dh, dh, generator=gen, dtype=torch.float64))[0].float()
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    return LokiLayer(basis, torch.as_tensor(dims).expand(hkv).clone(), budget, "all", select)


def make_qkv(b, hkv, g, t, s, dh, dtype, quantized=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if quantized:  # multiples of 1/4 in [-1, 1]: approximate scores exact in float32 and full of ties
        def draw(*shape):
            return torch.randint(-4, 5, shape, generator=gen).float() / 4
    else:
        def draw(*shape):
            return torch.randn(*shape, generator=gen)
    q = draw(b, t, hkv * g, dh).transpose(1, 2)  # [B, Hq, T, D] as a transposed view, like Transformers' query
    k, v = draw(b, hkv, s, dh), draw(b, hkv, s, dh)
    return tuple(x.to(DEVICE, dtype) for x in (q, k, v))


def op_inputs(layer, q, k, mask, keys_rotated=False):
    """The op's prepared inputs (q, qa, ka, kb, ranges) and keyword arguments, through the glue."""
    b, _, t, _ = q.shape
    ranges = key_ranges(mask, t, k.shape[2], b)
    assert ranges is not False
    kb = keys_per_row(layer, mask, ranges, b, t, k.shape[2], q.device)
    qe, qa, ka = prepare(layer, q, k, keys_rotated)
    kwargs = dict(group=layer.gqa_select == "group", sink=layer.budget.sink_tokens, recent=layer.budget.recent_tokens)
    return (qe, qa, ka, kb, ranges), kwargs


def run_kernels(layer, q, k, v, mask, scaling, keys_rotated=False, cfg=SMALL):
    """(out [B, T, Hq, D], kept keys per row [B, Hq, T], kb [B, T]) through the glue and the op."""
    b, hq, t, _ = q.shape
    (qe, qa, ka, kb, ranges), kwargs = op_inputs(layer, q, k, mask, keys_rotated)
    count = torch.full((b, hq, t), -7, dtype=torch.int32, device=q.device)
    out = loki_prefill_attention(qe, k, v, qa, ka, kb, ranges, scaling=scaling, config=cfg, count=count, **kwargs)
    return out, count, kb


def dense_path(layer, q, k, v, mask, scaling, keys_rotated=False):
    t, s = q.shape[2], k.shape[2]
    return loki_attention_dense(layer, q, k, v, visible_keys(mask, t, s, q.device), scaling, keys_rotated)


CASES = [  # (B, Hkv, G, T, S, D, dims, budget, select, dtype, pad)
    (2, 2, 1, 37, 37, 32, 8, Budget(0.25), "query", torch.float32, "none"),
    (2, 1, 3, 50, 50, 32, 16, Budget(0.3, sink_tokens=2, recent_tokens=3), "query", torch.bfloat16, "left"),
    (2, 1, 3, 45, 45, 16, 4, Budget(0.5, "paper", recent_tokens=4), "group", torch.float32, "right"),
    (1, 2, 4, 29, 61, 32, [3, 11], Budget(0.25, sink_tokens=1), "group", torch.bfloat16, "none"),  # 32 keys cached
    (2, 2, 2, 33, 33, 64, [5, 16], Budget(0.125, "paper", 6), "query", torch.float32, "left"),
    # token budgets: k_frac = 1 capped at 9 keys (SparQ's / Quest's form); the paper rule's share or 12 keys
    (2, 2, 1, 37, 37, 32, 8, Budget(1.0, k_tokens=9), "query", torch.float32, "left"),
    (2, 1, 3, 45, 45, 16, 4, Budget(0.5, "paper", recent_tokens=4, k_tokens=12), "group", torch.bfloat16, "right"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[2]}-{c[8]}-{str(c[9])[6:]}-{c[10]}")
def test_kernels_match_dense_path(case):
    """The kernels (through the glue) against the PyTorch path, both budget rules, min_tokens, sink / recent."""
    b, hkv, g, t, s, dh, dims, budget, select, dtype, pad = case
    layer = make_layer(hkv, dh, dims, budget, select)
    q, k, v = make_qkv(b, hkv, g, t, s, dh, dtype)
    mask, _ = make_mask(b, t, s, pad)
    mask = None if pad == "none" and s == t else mask
    out, count, kb = run_kernels(layer, q, k, v, mask, dh**-0.5)
    ref = dense_path(layer, q, k, v, mask, dh**-0.5)
    assert out.dtype == dtype and out.shape == ref.shape
    vis = visible_keys(mask, t, s, q.device).expand(b, 1, t, s)[:, 0]
    assert torch.equal(kb, layer.keys_per_row(vis.sum(-1), torch.arange(t, device=DEVICE) + s - t).int())
    assert torch.equal(count, kb[:, None].expand(b, hkv * g, t))
    assert rel_err(out, ref) < TOL[dtype]
    (qe, qa, ka, kb, _), kwargs = op_inputs(layer, q, k, mask)  # the op's reference on the op's own inputs
    naive = loki_prefill_attention_torch(qe, k, v, qa, ka, kb, vis[:, None], scaling=dh**-0.5, **kwargs)
    assert naive.dtype == dtype and rel_err(out, naive) < TOL[dtype]
    if budget.k_tokens is not None:  # the cap binds on the later rows
        assert int(kb.max()) == budget.k_tokens and bool((kb < vis.sum(-1)).any())


def test_keys_rotated_and_bisection():
    """Keys already in the basis (the Loki cache): exact part on rotated queries; order-key bisection."""
    b, hkv, g, t, dh = 2, 2, 2, 41, 32
    layer = make_layer(hkv, dh, 8, 0.25, "query")
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, seed=3)
    k_rot = layer.rotate_keys(k)
    mask, _ = make_mask(b, t, t, "left")
    out, count, kb = run_kernels(layer, q, k_rot, v, mask, 0.2, keys_rotated=True, cfg=BISECT)
    assert torch.equal(count, kb[:, None].expand_as(count))
    assert rel_err(out, dense_path(layer, q, k_rot, v, mask, 0.2, keys_rotated=True)) < 1e-5


def reference_f64(layer, q, k, v, vis, scaling, kb, sink=0, recent=0):
    """Float64, explicit selection: per row its first `sink` and last `recent` visible keys, then the best
    visible approximate scores up to kb keys, ties to earlier keys. vis [B, 1, T, S], kb [B, T]."""
    q, k, v, vis, kb = q.double().cpu(), k.double().cpu(), v.double().cpu(), vis.cpu(), kb.cpu()
    b, hq, t, dh = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    basis = layer.components.double()
    dims = layer.dims.tolist()
    qr = torch.einsum("bjgtd,jde->bjgte", q.view(b, hkv, g, t, dh), basis)
    kr = torch.einsum("bjsd,jde->bjse", k, basis)
    approx = torch.stack([qr[:, j, :, :, : dims[j]] @ kr[:, j, None, :, : dims[j]].transpose(-1, -2)
                          for j in range(hkv)], 1)  # [B, Hkv, G, T, S]
    if layer.gqa_select == "group":
        approx = approx.amax(2, keepdim=True)
    vis = vis.expand(b, 1, t, s)[:, :, None]  # [B, 1, 1, T, S]
    pos = torch.arange(s)
    first = torch.where(vis.any(-1), vis.int().argmax(-1), s)[..., None]  # [B, 1, 1, T, 1]
    last = s - 1 - vis.flip(-1).int().argmax(-1)[..., None]
    protected = vis & ((pos < first + sink) | (pos > last - recent))
    approx = approx.masked_fill(~vis, float("-inf")).masked_fill(protected, float("inf"))
    order = torch.sort(-approx, dim=-1, stable=True).indices  # ties: earlier positions first
    budget = kb[:, None, None, :, None]
    ranked = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, order, torch.arange(s).expand_as(order) < budget)
    keep = ranked.expand(b, hkv, g, t, s).reshape(b, hq, t, s)
    logits = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v.repeat_interleave(g, 1)).transpose(1, 2)


@pytest.mark.parametrize("select", ["query", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_earliest_positions(select, dtype):
    b, hkv, g, t, dh = 2, 1, 3, 47, 16
    layer = make_layer(hkv, dh, 4, 0.3, select, exact_basis=True)
    q, k, v = make_qkv(b, hkv, g, t, t, dh, dtype, quantized=True, seed=1)
    mask, _ = make_mask(b, t, t, "left")
    out, count, kb = run_kernels(layer, q, k, v, mask, 0.25)
    assert torch.equal(count, kb[:, None].expand_as(count))
    assert rel_err(out, reference_f64(layer, q, k, v, mask, 0.25, kb)) < (1e-6 if dtype == torch.float32 else 1e-2)


def adversarial_qkv(layer, b, g, t, d, pad, dtype, seed):
    """Quantized q, k, v (exact in the signed-permutation basis) whose approximate scores rank the keys of each
    sequence from earliest to latest, except its first two keys, ranked last: without protection a row keeps
    neither its first keys nor its most recent ones."""
    hkv, dh = layer.num_kv_heads, layer.components.shape[-1]
    q_rot, k_rot, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, quantized=True, seed=seed)
    q_rot, k_rot = q_rot.clone().cpu(), k_rot.clone().cpu()
    q_rot[..., :d] = 0.25
    k_rot[..., :d] = 0.0
    k_rot[..., 0] = -torch.arange(t, dtype=torch.float32) / 4  # scores -j / 16: later keys lower
    _, ranges = make_mask(b, t, t, pad)
    for i, start in enumerate(ranges[0].tolist()):
        k_rot[i, :, start: start + 2, 0] = -64.0
    basis = layer.components.cpu()
    q = torch.einsum("bjgte,jde->bjgtd", q_rot.view(b, hkv, g, t, dh), basis).flatten(1, 2)
    k = torch.einsum("bjse,jde->bjsd", k_rot, basis)
    return tuple(x.to(DEVICE, dtype) for x in (q, k, v))


@pytest.mark.parametrize("rule", ["row", "paper"])
@pytest.mark.parametrize("select, pad", [("query", "left"), ("group", "right")])
def test_sink_and_recent_are_kept_against_adversarial_scores(rule, select, pad):
    """sink = 2, recent = 3 with kb at most 8 (k_frac = 0.2; at least 5, or all the row sees), padding on either
    side: the protected keys have the lowest approximate scores of every row, yet each row keeps them. The kernels
    equal the float64 reference and the PyTorch path, keep kb keys per row, and differ from the unprotected
    selection."""
    b, hkv, g, t, dh, d = 2, 1, 2, 40, 16, 4
    layer = make_layer(hkv, dh, d, Budget(0.2, rule, sink_tokens=2, recent_tokens=3), select, exact_basis=True)
    q, k, v = adversarial_qkv(layer, b, g, t, d, pad, torch.bfloat16, seed=6)
    mask, _ = make_mask(b, t, t, pad)
    out, count, kb = run_kernels(layer, q, k, v, mask, 0.25)
    n = mask[:, 0].sum(-1)
    assert torch.equal(kb, torch.minimum(n, kb.clamp_min(5)).int()) and 5 < int(kb.max()) <= 8
    assert torch.equal(count, kb[:, None].expand_as(count))
    ref = reference_f64(layer, q, k, v, mask, 0.25, kb, sink=2, recent=3)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(dense_path(layer, q, k, v, mask, 0.25), ref) < 1e-2
    assert rel_err(reference_f64(layer, q, k, v, mask, 0.25, kb), ref) > 0.1  # protection changes the result


def test_dense_rows_before_sparse_from():
    """decode_rows: the rows before sparse_from[b] keep every key they see (kb = n). Row blocks of such rows make
    no pass over the keys in stage 1 (and compute no approximate score in stage 2); the result equals the PyTorch
    path, and the dense rows equal plain causal attention."""
    b, hkv, g, t, dh = 2, 1, 2, 48, 16
    layer = make_layer(hkv, dh, 4, Budget(0.25, sink_tokens=1, recent_tokens=2), "group")
    layer.sparse_from = torch.tensor([33, 40], device=DEVICE)  # rows 0-31 of both sequences: two dense blocks
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, seed=7)
    mask, (start, end) = make_mask(b, t, t, "left")
    out, count, kb = run_kernels(layer, q, k, v, mask, 0.25)
    n = visible_counts(key_ranges(mask, t, t, b), b, t, t, q.device)
    assert torch.equal(kb[0, :33], n[0, :33].int()) and torch.equal(kb[1, :40], n[1, :40].int())
    assert bool((kb[:, 40:] < n[:, 40:]).all())
    assert torch.equal(count, kb[:, None].expand_as(count))
    assert rel_err(out, dense_path(layer, q, k, v, mask, 0.25)) < 1e-5
    full = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), attn_mask=mask, scale=0.25
    ).nan_to_num(0.0).masked_fill(~mask.any(-1, keepdim=True), 0.0).transpose(1, 2)
    assert rel_err(out[:, :32], full[:, :32]) < 1e-5
    _, qa, ka = prepare(layer, q, k, False)
    ranges = key_ranges(mask, t, t, b)
    passes = torch.full((b * hkv, 3), -1, dtype=torch.int32, device=DEVICE)
    prefill_thresholds(qa, ka, kb, ranges, True, 1, 2, SMALL, passes=passes)
    assert passes[:, :2].eq(0).all() and passes[:, 2].gt(0).all()


def test_all_scores_equal():
    """Every approximate score ties (rotated queries are zero on the first d dims): the first k_b keys are kept."""
    b, hkv, g, t, dh = 1, 1, 2, 35, 16
    layer = make_layer(hkv, dh, 4, 0.25, "query", exact_basis=True)
    q_rot, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, quantized=True, seed=2)
    q_rot = q_rot.clone()
    q_rot[..., :4] = 0.0
    q = q_rot @ layer.components[0].T.to(DEVICE)  # exact: the basis is a signed permutation
    out, count, kb = run_kernels(layer, q, k, v, None, 0.25)
    assert torch.equal(count, kb[:, None].expand_as(count))
    assert rel_err(out, reference_f64(layer, q, k, v, visible_keys(None, t, t, q.device), 0.25, kb)) < 1e-6


@pytest.mark.parametrize("select", ["query", "group"])
def test_full_budget_is_full_attention(select):
    b, hkv, g, t, dh = 2, 1, 4, 40, 32
    layer = make_layer(hkv, dh, dh, 1.0, select)
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, seed=4)
    mask, _ = make_mask(b, t, t, "left")
    out, count, _ = run_kernels(layer, q, k, v, mask, 0.3)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), attn_mask=mask, scale=0.3
    ).nan_to_num(0.0).masked_fill(~mask.any(-1, keepdim=True), 0.0).transpose(1, 2)
    assert torch.equal(count, mask.sum(-1, dtype=torch.int32).expand(b, hkv * g, t))
    assert rel_err(out, dense) < 1e-5


def test_poisoned_output_is_overwritten_and_blind_rows_are_zero():
    b, hkv, g, t, dh = 2, 1, 2, 30, 32
    layer = make_layer(hkv, dh, 8, 0.25, "group")
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.bfloat16, seed=5)
    mask, _ = make_mask(b, t, t, "left")
    ranges = key_ranges(mask, t, t, b)
    kb = keys_per_row(layer, mask, ranges, b, t, t, q.device)
    qe, qa, ka = prepare(layer, q, k, False)
    out = torch.full((b, t, hkv * g, dh), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    loki_prefill_attention(qe, k, v, qa, ka, kb, ranges, group=True, scaling=0.2, config=SMALL, out=out)
    assert rel_err(out, reference_f64(layer, q, k, v, mask, 0.2, kb)) < 1e-2  # every NaN written over
    blind = ~mask[:, 0].any(-1)  # [B, T]: rows of left padding
    assert blind.any() and (out[blind] == 0).all() and (out[~blind].abs().sum(-1) > 0).all()


def op_args(**change):
    """Valid arguments of the op (B = 2, Hq = 4, Hkv = 2, T = 6, S = 9, D = 16, DP = 16), with `change` applied."""
    args = dict(q=torch.zeros(2, 4, 6, 16), k=torch.zeros(2, 2, 9, 16), v=torch.zeros(2, 2, 9, 16),
                qa=torch.zeros(2, 4, 6, 16), ka=torch.zeros(2, 2, 9, 16), kb=torch.ones(2, 6, dtype=torch.int32),
                ranges=None, group=True, scaling=0.25)
    return {**args, **change}


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.zeros(2, 4, 16)), ValueError, "q must be \\[B, Hq, T, D\\]"),
    (dict(k=torch.zeros(2, 3, 9, 16), v=torch.zeros(2, 3, 9, 16), ka=torch.zeros(2, 3, 9, 16)), ValueError,
     "Hq a multiple of Hkv"),
    (dict(k=torch.zeros(2, 2, 5, 16), v=torch.zeros(2, 2, 5, 16), ka=torch.zeros(2, 2, 5, 16)), ValueError, "S >= T"),
    (dict(qa=torch.zeros(2, 4, 6, 12), ka=torch.zeros(2, 2, 9, 12)), ValueError, "approx_width"),
    (dict(ka=torch.zeros(2, 2, 9, 32)), ValueError, "approx_width"),
    (dict(q=torch.zeros(2, 4, 6, 16, dtype=torch.float64)), TypeError, "one dtype of"),
    (dict(kb=torch.ones(2, 5, dtype=torch.int32)), ValueError, "kb must be an int32/int64 tensor \\[2, 6\\]"),
    (dict(kb=torch.ones(2, 6)), ValueError, "kb must be an int32/int64"),
    (dict(ranges=(torch.zeros(2, dtype=torch.int32),)), ValueError, "ranges must be \\(start, end\\)"),
    (dict(ranges=(torch.zeros(2), torch.ones(2))), ValueError, "ranges\\[0\\] must be an int32/int64"),
    (dict(sink=-1), ValueError, "sink must be an int >= 0"),
    (dict(recent=2.0), ValueError, "recent must be an int >= 0"),
    (dict(out=torch.zeros(2, 4, 6, 16)), ValueError, "out must be a \\[B, T, Hq, D\\]"),
    (dict(count=torch.zeros(2, 4, 6)), ValueError, "count must be a contiguous int32"),
])
def test_bad_arguments_raise(change, error, match):
    args = op_args(**change)
    tensors = [args.pop(name) for name in ("q", "k", "v", "qa", "ka", "kb", "ranges")]
    with pytest.raises(error, match=match):
        loki_prefill_attention(*tensors, **args)


def test_approx_width():
    assert [approx_width(d) for d in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]


def test_key_ranges_are_kept_on_the_mask():
    b, t, s = 3, 6, 9
    mask, (start, end) = make_mask(b, t, s, "left")
    got = key_ranges(mask, t, s, b)
    assert torch.equal(got[0].cpu(), start.int()) and torch.equal(got[1].cpu(), end.int())
    assert key_ranges(mask, t, s, b) is got  # same mask object: kept on it
    assert key_ranges(mask.clone(), t, s, b) is not got
    mask, (start, end) = make_mask(b, t, s, "right")
    assert torch.equal(key_ranges(mask, t, s, b)[1].cpu(), end.int())
    additive = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(key_ranges(additive, t, s, b)[1].cpu(), end.int())
    assert key_ranges(None, t, s, b) is None
    causal, _ = make_mask(1, t, s, "none")  # one mask for the whole batch
    assert torch.equal(key_ranges(causal, t, s, b)[0].cpu(), torch.zeros(b, dtype=torch.int32))
    window = causal & (torch.arange(s, device=DEVICE) > torch.arange(t, device=DEVICE)[:, None])  # sliding window
    assert key_ranges(window, t, s, b) is False
    holes = causal.clone()
    holes[..., 2] = False
    assert key_ranges(holes, t, s, b) is False


def test_keys_per_row_are_kept_on_the_mask_per_budget_and_start():
    b, t = 2, 20
    mask, _ = make_mask(b, t, t, "left")
    ranges = key_ranges(mask, t, t, b)
    layer = make_layer(1, 16, 4, 0.25, "query")
    kb = keys_per_row(layer, mask, ranges, b, t, t, mask.device)
    assert keys_per_row(make_layer(1, 16, 4, 0.25, "group"), mask, ranges, b, t, t, mask.device) is kb
    assert not torch.equal(keys_per_row(make_layer(1, 16, 4, 0.5, "query"), mask, ranges, b, t, t, mask.device), kb)
    layer.sparse_from = torch.tensor([10, 10], device=DEVICE)
    dense_first = keys_per_row(layer, mask, ranges, b, t, t, mask.device)
    assert torch.equal(dense_first[:, :10], visible_counts(ranges, b, t, t, mask.device)[:, :10].int())
    assert not torch.equal(dense_first, kb)


def test_forward_falls_back_where_kernels_do_not_apply():
    layer = make_layer(1, 16, 4, 0.25, "query")
    q, k, v = make_qkv(1, 1, 2, 8, 8, 16, torch.float32)
    causal, _ = make_mask(1, 8, 8, "none")
    window = causal & (torch.arange(8, device=DEVICE) > torch.arange(8, device=DEVICE)[:, None] - 3)
    assert glue.loki_prefill_forward(layer, q, k, v, window, 0.25, False) is None
    assert glue.loki_prefill_forward(layer, q.double(), k.double(), v.double(), None, 0.25, False) is None


@pytest.mark.parametrize("select, budget", [("query", {}), ("group", dict(k_rule="paper", sink_tokens=2,
                                                                            recent_tokens=3, dense_layers=[1])),
                                            ("query", dict(k_frac=1.0, k_tokens=4))])
def test_patched_model_uses_kernels_with_padding(monkeypatch, select, budget):
    """A patched tiny Llama in mode "all" with left padding: kernel path (interpreter on the CPU) = dense path;
    under decode_rows too (rows before the start dense); with a fixed budget of 4 keys (k_frac = 1, k_tokens = 4)."""
    from hf_patch import decode_rows, patch_loki
    from loki_helpers import PLAIN, random_basis, tiny_model

    model = tiny_model().to(DEVICE)
    patch_loki(model, random_basis(), mode="all", gqa_select=select, **{**PLAIN, "d_frac": 0.25, "k_frac": 0.25,
                                                                       **budget})
    ids = torch.randint(3, 90, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    attn = torch.ones_like(ids)
    attn[1, :6] = 0
    calls = []
    real = glue.loki_prefill_attention
    with torch.no_grad():
        monkeypatch.setattr(glue, "loki_prefill_forward", lambda *a, **kw: None)  # the PyTorch path everywhere
        dense = model(ids, attention_mask=attn).logits
        with decode_rows(model, [12, 15]):
            dense_rows = model(ids, attention_mask=attn).logits
        monkeypatch.undo()
        for layer in loki_layers(model):
            layer.prefill_kernels_on_cpu = True  # the kernels on CPU tensors too (Triton's interpreter)
        monkeypatch.setattr(glue, "loki_prefill_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        fast = model(ids, attention_mask=attn).logits
        with decode_rows(model, [12, 15]):
            fast_rows = model(ids, attention_mask=attn).logits
    assert len(calls) == (2 if "dense_layers" in budget else 4)  # the sparse layers, two forwards
    keep = attn.bool()
    assert rel_err(fast[keep], dense[keep]) < 1e-5
    assert rel_err(fast_rows[keep], dense_rows[keep]) < 1e-5


COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_patch.kernels.loki import prefill as lp

for dt, g_sel, protect, cfg in (("bf16", 1, False, lp.LokiPrefillConfig()), ("fp16", 3, True, lp.LokiPrefillConfig())):
    common = dict(G_SEL=g_sel, HAS_RANGE=True, PROTECT=protect, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_DP=16, DOT_PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    for fn, consts, ptrs, opts in (
        (lp._threshold_kernel, dict(MAX_INTERP=24, MAX_ITER=64, PASSES=True),
         dict(qa_ptr=dt, ka_ptr=dt, kb_ptr="i32", start_ptr="i32", end_ptr="i32", thr_ptr="fp32", pos_ptr="i32",
              passes_ptr="i32"), dict(num_warps=cfg.num_warps)),
        (lp._attention_kernel, dict(COUNT=True, HEAD_DIM=64, BLOCK_D=64),
         dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, qa_ptr=dt, ka_ptr=dt, thr_ptr="fp32", pos_ptr="i32", start_ptr="i32",
              end_ptr="i32", out_ptr=dt, cnt_ptr="i32"), dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)),
    ):
        consts = {**common, **consts}
        sig = {n: "constexpr" if n in consts else "*" + ptrs[n] if n in ptrs else "fp32" if n == "qk_scale" else "i32"
               for n in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                   if n in ptrs or n.startswith("stride") or n in ("T", "S")}  # as a launch with aligned tensors
        kernel = triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32), options=opts)
        assert kernel.asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects: compile both kernels for an H100 (no GPU needed,
    Triton's bundled ptxas), with the alignment hints of a real launch, with and without protection."""
    import os
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
