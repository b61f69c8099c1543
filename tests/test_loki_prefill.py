"""Loki prefill kernels (mode "all", hf_patch/kernels/loki_prefill.py): Triton (interpreter on the CPU) against
the PyTorch dense path and a float64 reference with the earliest-position tie rule."""
from __future__ import annotations

import pytest
import torch

from hf_patch.kernels import loki_prefill as lp
from hf_patch.kernels.loki_prefill import LokiPrefillConfig, key_ranges, loki_prefill_attention, row_budgets
from hf_patch.loki import attention as la
from hf_patch.loki.attention import LokiLayer, loki_attention_dense, visible_keys
from hf_patch.loki.budget import num_tokens

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


def make_layer(hkv, dh, dims, k_frac, select, exact_basis=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if exact_basis:  # signed permutations: rotations without rounding
        basis = torch.stack([torch.eye(dh)[torch.randperm(dh, generator=gen)] for _ in range(hkv)])
        basis = basis * (torch.randint(0, 2, (hkv, 1, dh), generator=gen) * 2 - 1)
    else:
        basis = torch.linalg.qr(torch.randn(hkv, dh, dh, generator=gen, dtype=torch.float64))[0].float()
    return LokiLayer(basis, torch.as_tensor(dims).expand(hkv).clone(), k_frac, "all", select)


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


def run_kernels(layer, q, k, v, mask, scaling, keys_rotated=False, cfg=SMALL):
    """(out [B, T, Hq, D], kept keys per row [B, Hq, T]) through the kernel entry point, ranges from the mask."""
    b, hq, t, _ = q.shape
    ranges = key_ranges(mask, t, k.shape[2], b)
    assert ranges is not False
    count = torch.full((b, hq, t), -7, dtype=torch.int32, device=q.device)
    out = loki_prefill_attention(layer, q, k, v, ranges, scaling, keys_rotated, cfg, count=count)
    return out, count


def expected_counts(mask, b, hq, t, s, k_frac):
    ranges = key_ranges(mask, t, s, b)
    return row_budgets(ranges, b, t, s, k_frac, torch.device(DEVICE))[:, None].expand(b, hq, t)


CASES = [  # (B, Hkv, G, T, S, D, dims, k_frac, select, dtype, pad)
    (2, 2, 1, 37, 37, 32, 8, 0.25, "query", torch.float32, "none"),
    (2, 1, 3, 50, 50, 32, 16, 0.3, "query", torch.bfloat16, "left"),
    (2, 1, 3, 45, 45, 16, 4, 0.5, "group", torch.float32, "right"),
    (1, 2, 4, 29, 61, 32, [3, 11], 0.25, "group", torch.bfloat16, "none"),  # 32 cached keys before the rows
    (2, 2, 2, 33, 33, 64, [5, 16], 0.125, "query", torch.float32, "left"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[2]}-{c[8]}-{str(c[9])[6:]}-{c[10]}")
def test_kernels_match_dense_path(case):
    b, hkv, g, t, s, dh, dims, k_frac, select, dtype, pad = case
    layer = make_layer(hkv, dh, dims, k_frac, select)
    q, k, v = make_qkv(b, hkv, g, t, s, dh, dtype)
    mask, _ = make_mask(b, t, s, pad)
    mask = None if pad == "none" and s == t else mask
    out, count = run_kernels(layer, q, k, v, mask, dh**-0.5)
    ref = loki_attention_dense(layer, q, k, v, visible_keys(mask, t, s, q.device), dh**-0.5, False)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(count, expected_counts(mask, b, hkv * g, t, s, k_frac))
    assert rel_err(out, ref) < TOL[dtype]


def test_keys_rotated_and_bisection():
    """Keys already in the basis (the Loki cache): exact part on rotated queries; order-key bisection."""
    b, hkv, g, t, dh = 2, 2, 2, 41, 32
    layer = make_layer(hkv, dh, 8, 0.25, "query")
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, seed=3)
    k_rot = layer.rotate_keys(k)
    mask, _ = make_mask(b, t, t, "left")
    out, count = run_kernels(layer, q, k_rot, v, mask, 0.2, keys_rotated=True, cfg=BISECT)
    ref = loki_attention_dense(layer, q, k_rot, v, visible_keys(mask, t, t, q.device), 0.2, True)
    assert torch.equal(count, expected_counts(mask, b, hkv * g, t, t, 0.25))
    assert rel_err(out, ref) < 1e-5


def reference_f64(layer, q, k, v, vis, scaling):
    """Float64, explicit selection: per row the k_b best visible approximate scores, ties to earlier keys."""
    q, k, v, vis = q.double().cpu(), k.double().cpu(), v.double().cpu(), vis.cpu()
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
    approx = approx.masked_fill(~vis[:, :, None], float("-inf"))
    order = torch.sort(-approx, dim=-1, stable=True).indices  # ties: earlier positions first
    budget = num_tokens(vis.sum(-1), layer.k_frac)[:, :, None, :, None]  # [B, 1, 1, T, 1]
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
    out, count = run_kernels(layer, q, k, v, mask, 0.25)
    ref = reference_f64(layer, q, k, v, mask, 0.25)
    assert torch.equal(count, expected_counts(mask, b, hkv * g, t, t, 0.3))
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_all_scores_equal():
    """Every approximate score ties (rotated queries are zero on the first d dims): the first k_b keys are kept."""
    b, hkv, g, t, dh = 1, 1, 2, 35, 16
    layer = make_layer(hkv, dh, 4, 0.25, "query", exact_basis=True)
    q_rot, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, quantized=True, seed=2)
    q_rot = q_rot.clone()
    q_rot[..., :4] = 0.0
    q = q_rot @ layer.components[0].T.to(DEVICE)  # exact: the basis is a signed permutation
    out, count = run_kernels(layer, q, k, v, None, 0.25)
    assert torch.equal(count, expected_counts(None, b, hkv * g, t, t, 0.25))
    assert rel_err(out, reference_f64(layer, q, k, v, visible_keys(None, t, t, q.device), 0.25)) < 1e-6


@pytest.mark.parametrize("select", ["query", "group"])
def test_full_budget_is_full_attention(select):
    b, hkv, g, t, dh = 2, 1, 4, 40, 32
    layer = make_layer(hkv, dh, dh, 1.0, select)
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.float32, seed=4)
    mask, _ = make_mask(b, t, t, "left")
    out, count = run_kernels(layer, q, k, v, mask, 0.3)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), attn_mask=mask, scale=0.3
    ).nan_to_num(0.0).masked_fill(~mask.any(-1, keepdim=True), 0.0).transpose(1, 2)
    assert torch.equal(count, mask.sum(-1, dtype=torch.int32).expand(b, hkv * g, t))
    assert rel_err(out, dense) < 1e-5


def test_poisoned_output_is_overwritten_and_blind_rows_are_zero():
    b, hkv, g, t, dh = 2, 1, 2, 30, 32
    layer = make_layer(hkv, dh, 8, 0.25, "group")
    q, k, v = make_qkv(b, hkv, g, t, t, dh, torch.bfloat16, seed=5)
    mask, (start, _) = make_mask(b, t, t, "left")
    out = torch.full((b, t, hkv * g, dh), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    loki_prefill_attention(layer, q, k, v, key_ranges(mask, t, t, b), 0.2, False, SMALL, out=out)
    assert torch.isfinite(out).all()
    blind = ~mask[:, 0].any(-1)  # [B, T]: rows of left padding
    assert blind.any() and (out[blind] == 0).all() and (out[~blind].abs().sum(-1) > 0).all()


def test_key_ranges():
    b, t, s = 3, 6, 9
    mask, (start, end) = make_mask(b, t, s, "left")
    got = key_ranges(mask, t, s, b)
    assert torch.equal(got[0].cpu(), start.int()) and torch.equal(got[1].cpu(), end.int())
    assert key_ranges(mask, t, s, b) is got  # same mask object: cached
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


def test_forward_falls_back_where_kernels_do_not_apply():
    layer = make_layer(1, 16, 4, 0.25, "query")
    q, k, v = make_qkv(1, 1, 2, 8, 8, 16, torch.float32)
    causal, _ = make_mask(1, 8, 8, "none")
    window = causal & (torch.arange(8, device=DEVICE) > torch.arange(8, device=DEVICE)[:, None] - 3)
    assert lp.loki_prefill_forward(layer, q, k, v, window, 0.25, False) is None
    assert lp.loki_prefill_forward(layer, q.double(), k.double(), v.double(), None, 0.25, False) is None


@pytest.mark.parametrize("select", ["query", "group"])
def test_patched_model_uses_kernels_with_padding(monkeypatch, select):
    """A patched tiny Llama in mode "all" with left padding: kernel path (interpreter on the CPU) = dense path."""
    from hf_patch import patch_loki
    from loki_helpers import random_basis, tiny_model

    model = tiny_model().to(DEVICE)
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="all", gqa_select=select)
    ids = torch.randint(3, 90, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    attn = torch.ones_like(ids)
    attn[1, :6] = 0
    calls = []
    real = lp.loki_prefill_attention
    with torch.no_grad():
        monkeypatch.setattr(lp, "loki_prefill_forward", lambda *a, **kw: None)  # the PyTorch path everywhere
        dense = model(ids, attention_mask=attn).logits
        monkeypatch.undo()
        monkeypatch.setattr(la, "PREFILL_KERNELS_ON_CPU", True)
        monkeypatch.setattr(lp, "loki_prefill_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        fast = model(ids, attention_mask=attn).logits
    assert len(calls) == 2  # both layers
    keep = attn.bool()
    assert rel_err(fast[keep], dense[keep]) < 1e-5


COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_patch.kernels import loki_prefill as lp

for dt, g_sel, cfg in (("bf16", 1, lp.LokiPrefillConfig()), ("fp16", 3, lp.LokiPrefillConfig())):
    common = dict(G_SEL=g_sel, HAS_RANGE=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DP=16,
                  DOT_PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False)
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
    Triton's bundled ptxas), with the alignment hints of a real launch."""
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
