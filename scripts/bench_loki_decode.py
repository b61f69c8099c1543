"""One Loki decode attention step against full attention (SDPA) on the GPU: correctness first, then speed.

1. Checks the Triton path (its three forms: one fused kernel, scores + one-program-per-row selection + attention,
   scores + multi-program selection + attention; with and without the narrow key copy `k_approx`) and the PyTorch
   path run on the GPU against a float64 dense reference with an explicit selection mask, on fresh random inputs
   at real sizes (relative error, NaN check, poisoned output, bitwise repeatability), with and without protected
   sink / recent keys; the selection alone against a stable sort on adversarial rows (ties on a grid of values,
   an outlier pattern that misleads the sample, padding, one fully padded sequence, +inf runs at both ends of
   padded rows as stage 1 writes for protected keys).
2. Optionally (--sweep) times the whole step under a few launch configurations on representative shapes.
3. Times SDPA (fastest of its fair forms: flash/efficient, GQA-packed or enable_gqa) and Loki (reading the
   approximate scores from a narrow key copy, as `LokiCache` keeps one) at B in {1, 8, 16},
   S in {4k, 16k, 64k, 128k}, Llama-3-8B heads (32 q, 8 KV, D = 128), bf16,
   (d_frac, k_frac) in {(0.25, 0.25), (0.25, 0.125), (0.5, 0.25)}: do_bench medians (L2 flushed by do_bench,
   inputs rotated), back-to-back steps (CPU launch cost included) and CUDA-graph replays; Loki without the
   narrow copy at the first setting; with --sink / --recent, each setting again with that many protected keys
   (same k: protection changes which keys are read, not how many); the stage split (scores, top-k selection,
   gather-attention with its merge), the selection's share and torch.topk on the same scores for comparison;
   effective bandwidth and the bandwidth floors; the host (CPU) cost of each piece; and the dense step (exact
   attention over the whole cache, what a step runs where the budget keeps every key, e.g. under `min_tokens`)
   against SDPA, after its own check against float64.

    PYTHONPATH=. python scripts/bench_loki_decode.py [--sweep] [--json out.json] [--batches 8 16] [--seqs 16384]
        [--settings 0.25:0.25] [--sink 4 --recent 64] [--skip-checks] [--no-table]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from hf_patch.kernels.loki import (
    DecodeWorkspace,
    LokiKernelConfig,
    dense_decode_attention_torch,
    dense_decode_attention_triton,
    loki_decode_attention,
    loki_decode_attention_torch,
    loki_decode_attention_triton,
)
from hf_patch.kernels.loki.attention import triton_attend
from hf_patch.kernels.loki.problem import check_decode
from hf_patch.kernels.loki.scores import triton_scores
from hf_patch.kernels.loki.select import one_program_select, select_tokens
from hf_patch.loki.budget import Budget, num_dims

HQ, HKV, D = 32, 8, 128
SETTINGS = [(0.25, 0.25), (0.25, 0.125), (0.5, 0.25)]
BATCHES, SEQS = [1, 8, 16], [4096, 16384, 65536, 131072]
ROTATE_BYTES = 512 << 20  # inputs rotated over at least this many bytes so the 50 MB L2 cannot hold them
DEVICE = "cuda"


def budget_args(k_frac, s, kv_start=None, sink=0, recent=0) -> dict:
    """The op's budget arguments as `Budget` computes them (k for every row, or the bound k and k_b [B] on the
    device with kv_start), and kv_start."""
    rule = Budget(k_frac, sink_tokens=sink, recent_tokens=recent)
    args = dict(k=int(rule.tokens(torch.tensor(s))), sink=sink, recent=recent, kv_start=kv_start)
    if kv_start is not None:
        args["k"], args["k_b"] = rule.max_tokens(s), rule.tokens(s - kv_start.long()).to(torch.int32)
    return args


def dense_reference(q, keys, v, d, scaling, gqa_select, *, k, k_b=None, sink=0, recent=0, kv_start=None):
    """Float64 Loki on the GPU as a dense masked computation: [B, Hq, D] (independent of the kernels' code). Each
    sequence keeps its first `sink` and last `recent` valid keys and the best other scores, k_b (or k) in all."""
    q, keys, v = q.double(), keys.double(), v.double()
    b, hq, dh = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = hq // hkv
    qg = q.view(b, hkv, g, dh)
    dims = d.to(q.device) if isinstance(d, torch.Tensor) else torch.full((hkv,), d, device=q.device)
    keep_dims = (torch.arange(dh, device=q.device) < dims[:, None]).double()  # [Hkv, D]
    approx = torch.einsum("bjgd,bjsd->bjgs", qg * keep_dims[None, :, None], keys)
    start = kv_start.long() if kv_start is not None else torch.zeros(b, dtype=torch.long, device=q.device)
    pos = torch.arange(s, device=q.device)[None, :]
    valid = pos >= start[:, None]  # [B, S]
    protected = valid & ((pos < start[:, None] + sink) | (pos >= s - recent))
    approx = approx.masked_fill(protected[:, None, None], float("inf")).masked_fill(~valid[:, None, None],
                                                                                    float("-inf"))
    if gqa_select == "group":
        approx = approx.amax(2, keepdim=True).expand_as(approx)
    budget = k_b.long() if k_b is not None else torch.full((b,), k, device=q.device)  # [B]
    order = approx.argsort(dim=-1, descending=True)
    rank_ok = torch.arange(s, device=q.device)[None, :] < budget[:, None]  # [B, S]
    selected = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, order, rank_ok[:, None, None].expand_as(order))
    logits = torch.einsum("bjgd,bjsd->bjgs", qg, keys) * scaling
    probs = torch.softmax(logits.masked_fill(~selected, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bjgs,bjsd->bjgd", probs, v).reshape(b, hq, dh)


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def random_cache(b, s, dtype, capacity_extra=0):
    """q [B, Hq, D] and K, V views [:, :, :S] of a [B, Hkv, S + extra, D] buffer (as the in-place cache hands out)."""
    q = torch.randn(b, HQ, D, device=DEVICE, dtype=dtype)
    k = torch.randn(b, HKV, s + capacity_extra, D, device=DEVICE, dtype=dtype)[:, :, :s]
    v = torch.randn(b, HKV, s + capacity_extra, D, device=DEVICE, dtype=dtype)[:, :, :s]
    return q, k, v


def narrow_copy(k, d, capacity_extra=0):
    """The first d' = max d (rounded up to 8) dims of the keys in their own [B, Hkv, S + extra, d'] buffer, viewed
    [:, :, :S] (what `LokiCache` keeps beside the keys)."""
    d_max = int(max(d.tolist())) if isinstance(d, torch.Tensor) else d
    width = min(D, -(-d_max // 8) * 8)
    buf = k.new_empty((*k.shape[:2], k.shape[2] + capacity_extra, width))
    buf[:, :, : k.shape[2]] = k[..., :width]
    return buf[:, :, : k.shape[2]]


CHECK_CASES = [  # (B, S, dtype, gqa_select, d, k_frac, kv_start, (sink, recent), forms); "default": the form for S
    (2, 16411, torch.bfloat16, "group", 32, 0.25, [0, 1000], (0, 0), ["default", "fused", "one-program select",
                                                                       "multi-program select"]),
    (2, 16411, torch.bfloat16, "group", 32, 0.25, [0, 1000], (4, 64), ["default", "fused", "one-program select",
                                                                       "multi-program select"]),
    (2, 16411, torch.bfloat16, "query", 32, 0.25, None, (0, 0), ["default"]),
    (1, 65543, torch.float16, "group", "per-head", 0.125, None, (0, 0), ["default"]),
    (1, 65543, torch.float16, "group", "per-head", 0.125, None, (4, 64), ["default"]),
    (3, 4099, torch.float32, "query", 64, 0.5, [0, 17, 4000], (0, 0), ["default", "fused"]),
    (3, 4099, torch.float32, "query", 64, 0.022, [0, 17, 4000], (2, 80), ["default", "one-program select",
                                                                           "multi-program select"]),
    (4, 8192, torch.bfloat16, "group", 64, 0.25, None, (0, 0), ["default"]),
    (4, 3001, torch.bfloat16, "group", 32, 0.25, [0, 5, 3001, 2000], (0, 0), ["default"]),
    (4, 3001, torch.bfloat16, "group", 32, 0.25, [0, 5, 3001, 2000], (1, 16), ["default"]),
    (8, 131072, torch.bfloat16, "group", 32, 0.25, None, (0, 0), ["default"]),
    (8, 131072, torch.bfloat16, "group", 32, 0.25, None, (4, 64), ["default"]),
]
# (rows, S, k_frac); k_frac = 1: a bracket over most of the key range (wide histogram bins)
SELECT_CASES = [(64, 65536, 0.25), (128, 16384, 0.125), (8, 131072, 0.25), (16, 5000, 0.5), (16, 4099, 1.0)]
FULL_CHECK = (2, 4099)  # (B, S) of the d = D, k_frac = 1 check against SDPA
PER_HEAD_D = [16, 24, 32, 40, 48, 32, 16, 8]  # d per KV head in the "per-head" case
HOST_SEQS, HOST_REPS = (4096, 8192, 16384), 200  # host-cost measurement: cache lengths (one per form), calls
FORMS = {  # the three forms of the Triton path, forced whatever the length
    "fused": LokiKernelConfig(fused_max_seq=1 << 30),
    "one-program select": LokiKernelConfig(fused_max_seq=0, select_kernel_max_seq=1 << 30,
                                           select_kernel_min_rows_per_sm=0),
    "multi-program select": LokiKernelConfig(fused_max_seq=0, select_kernel_max_seq=0),
}
WORKSPACE = DecodeWorkspace()  # the scratch buffers that every Triton call here keeps between calls


def check_correctness() -> bool:
    print("## correctness vs a float64 dense reference (fresh random inputs, poisoned outputs)")
    print("| B | S | dtype | select | d | k_frac | kv_start | sink, recent | form | "
          "triton rel err (k_approx: no / yes) | torch-path rel err | NaN | repeat bitwise |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for b, s, dtype, select, d, k_frac, start, (sink, recent), forms in CHECK_CASES:
        torch.manual_seed(b * s)
        q, k, v = random_cache(b, s, dtype, capacity_extra=300)
        d = torch.tensor(PER_HEAD_D, dtype=torch.int32) if d == "per-head" else d
        k_approx = narrow_copy(k, d, capacity_extra=300)
        kv_start = torch.tensor(start, device=DEVICE, dtype=torch.int32) if start else None
        args = dict(d=d, scaling=D**-0.5, gqa_select=select, **budget_args(k_frac, s, kv_start, sink, recent))
        ref = dense_reference(q, k, v, **args) if s * b <= 200_000 else None
        err_p = rel_err(loki_decode_attention_torch(q, k, v, **args), ref) if ref is not None else float("nan")
        for form in forms:
            cfg = FORMS.get(form)
            errs, outs = [], []
            for narrow in (None, k_approx):
                loki_decode_attention_triton(q, k, v, k_approx=narrow, config=cfg, workspace=WORKSPACE,
                                             **args)  # compile first
                out = torch.full_like(q, float("nan"))
                loki_decode_attention_triton(q, k, v, k_approx=narrow, config=cfg, out=out, workspace=WORKSPACE,
                                             **args)
                torch.cuda.synchronize()
                outs.append(out)
            if ref is None:  # too large for the float64 dense reference: against the PyTorch path in float32
                ref = loki_decode_attention_torch(q.float(), k.float(), v.float(), **args).double()
            errs = [rel_err(out, ref) for out in outs]
            again = loki_decode_attention_triton(q, k, v, k_approx=k_approx, config=cfg, workspace=WORKSPACE, **args)
            same = bool(torch.equal(again, outs[1]) and torch.equal(outs[0], outs[1]))
            nan = bool(any(out.isnan().any() for out in outs))
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            ok &= max(errs) < tol and not (err_p >= tol) and not nan and same
            dd = "per-head" if isinstance(d, torch.Tensor) else d
            print(f"| {b} | {s} | {str(dtype)[6:]} | {select} | {dd} | {k_frac} | {start} | {sink}, {recent} | "
                  f"{form} | {errs[0]:.2e} / {errs[1]:.2e} | {err_p:.2e} | {nan} | {same} |", flush=True)
        del q, k, v, k_approx
    q, k, v = random_cache(*FULL_CHECK, torch.bfloat16)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    for form, cfg in FORMS.items():
        full = loki_decode_attention_triton(q, k, v, d=D, k=k.shape[2], scaling=D**-0.5, config=cfg,
                                            workspace=WORKSPACE)
        err = rel_err(full, sdpa.double())
        ok &= err < 5e-3  # two bf16 roundings give 2-3e-3; 3 of 4099 keys dropped gave 8.6e-3
        print(f"d = D, k_frac = 1 vs SDPA (bf16, B, S = {FULL_CHECK}, {form}): rel err {err:.2e}")
    ok &= check_selection()
    print(f"correctness: {'PASS' if ok else 'FAIL'}\n")
    return ok


DENSE_CHECK_CASES = [  # (B, S, dtype, kv_start, kv_end): the dense step of budgets that keep every key
    (1, 4096, torch.bfloat16, None, None), (8, 16411, torch.bfloat16, [0, 9, 300, 0, 0, 0, 0, 0], None),
    (3, 65543, torch.float16, [0, 17, 100], [65543, 40000, 100]), (2, 4099, torch.float32, [0, 5], [4099, 4000]),
]


def check_dense() -> bool:
    """The dense decode step (Triton) against a float64 softmax over each sequence's [kv_start, kv_end), memory
    past kv_end poisoned with NaN; a sequence without valid keys must give zeros."""
    print("## dense decode step vs float64 (the step of a budget that keeps every key)")
    print("| B | S | dtype | kv_start | kv_end | rel. error | NaN |\n|---|---|---|---|---|---|---|")
    ok = True
    for b, s, dtype, start, end in DENSE_CHECK_CASES:
        q, k, v = random_cache(b, s, dtype)
        kv_start = None if start is None else torch.tensor(start, dtype=torch.int32, device=DEVICE)
        kv_end = None if end is None else torch.tensor(end, dtype=torch.int32, device=DEVICE)
        if kv_end is not None:
            k, v = k.clone(), v.clone()
            for row, e in enumerate(end):
                v[row, :, e:] = float("nan")
        ref = dense_decode_attention_torch(q.double(), k.double(), v.double(), scaling=D**-0.5,
                                           kv_start=kv_start, kv_end=kv_end)
        out = dense_decode_attention_triton(q, k, v, scaling=D**-0.5, kv_start=kv_start, kv_end=kv_end,
                                            workspace=WORKSPACE)
        err, nan = rel_err(out, ref), bool(out.isnan().any())
        good = err < {torch.float32: 1e-5}.get(dtype, 5e-3) and not nan
        ok &= good
        print(f"| {b} | {s} | {dtype} | {start} | {end} | {err:.1e}{'' if good else ' FAIL'} | {nan} |")
    print()
    return ok


def check_selection() -> bool:
    """Both selections against a stable sort (ties to the earliest positions, increasing order) on rows built to
    be hard: a grid of values (many ties at the threshold, across chunks), a sample-misleading outlier pattern
    (every 16th position large: the strided sample sees only those), padding with one fully padded row, and
    padded rows with +inf at their first 4 and last 64 valid positions (stage 1 with sink 4, recent 64)."""
    ok = True
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    for rows, s, k_frac in SELECT_CASES:
        pos = torch.arange(s, device=DEVICE)[None]
        grid = torch.round(torch.randn(rows, s, device=DEVICE, generator=gen) * 4) / 4
        outliers = torch.randn(rows, s, device=DEVICE, generator=gen) + 20.0 * (pos % 16 == 0)
        padded = torch.randn(rows, s, device=DEVICE, generator=gen)
        starts = torch.randint(0, s, (rows,), device=DEVICE, generator=gen)
        starts[-1] = s
        padded = padded.masked_fill(pos < starts[:, None], float("-inf"))
        protected = padded.masked_fill((pos >= starts[:, None]) & ((pos < starts[:, None] + 4) | (pos >= s - 64)),
                                       float("inf"))
        plain, guarded_rule = Budget(k_frac), Budget(k_frac, sink_tokens=4, recent_tokens=64)
        k = plain.max_tokens(s)
        for name, scores, k_b in (("grid", grid, None), ("outliers", outliers, None),
                                  ("padded", padded, plain.tokens(s - starts).to(torch.int32)),
                                  ("protected", protected, guarded_rule.tokens(s - starts).to(torch.int32))):
            budgets = k_b.tolist() if k_b is not None else [k] * rows
            order = torch.sort(-scores.double(), dim=-1, stable=True).indices
            for multi in (False, True):
                cfg = FORMS["multi-program select" if multi else "one-program select"]
                idx = select_tokens(scores, max(k, max(budgets)), k_b, 1, cfg, WORKSPACE)
                good = all(torch.equal(idx[r, : budgets[r]].long(), order[r, : budgets[r]].sort().values)
                           for r in range(rows))
                ok &= good
                if not good:
                    print(f"selection FAILED: {name}, rows={rows}, S={s}, multi-program={multi}")
    print(f"selection vs stable sort (grid ties / misleading sample / padding / protected runs; both selections): "
          f"{'ok' if ok else 'FAILED'}")
    return ok


def sdpa_forms(q, k, v):
    """Fair SDPA decode forms of the same function: GQA-packed (the G heads of a KV head as G query rows) and
    enable_gqa, each on the flash and memory-efficient backends."""
    b = q.shape[0]
    qp = q.view(b, HKV, HQ // HKV, D)
    q1 = q[:, :, None]
    forms = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def packed(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qp, k, v)

        def gqa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)

        forms[f"{name}-packed"], forms[f"{name}-gqa"] = packed, gqa
    return forms


def time_rotated(fns) -> float:
    """do_bench median (ms) of one call, cycling over input sets."""
    it = itertools.cycle(fns)
    return do_bench(lambda: next(it)(), warmup=15, rep=60, return_mode="median")


def time_back_to_back(fns, reps: int = 20) -> float:
    """Wall time (ms) per call of `reps` rounds over all input sets, launched back to back (CPU cost included)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for f in fns:
            f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * len(fns))


def time_graph(fns) -> float:
    """Median ms per call of a CUDA graph that runs every input set once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return do_bench(graph.replay, warmup=15, rep=60, return_mode="median") / len(fns)


def guarded(timer, fns) -> float:
    """`timer(fns)`, or NaN (reported) when it fails, so one failed capture does not lose the run."""
    try:
        return timer(fns)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"<{timer.__name__} failed: {type(exc).__name__}: {str(exc)[:200]}>")
        torch.cuda.synchronize()
        return float("nan")


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (t * 1e-3)


def make_sets(b, s):
    """Input sets (q, k, v, {d': narrow copy of the first d' key dims}) rotated over >= ROTATE_BYTES."""
    per_set = 2 * b * HKV * s * D * 2
    n = max(2, min(16, math.ceil(ROTATE_BYTES / per_set)))
    sets = []
    for _ in range(n):
        q, k, v = random_cache(b, s, torch.bfloat16)
        sets.append((q, k, v, {d: narrow_copy(k, d) for d in sorted({num_dims(f, D) for f, _ in SETTINGS})}))
    return sets


def loki_fns(sets, d, k_frac, narrow=True, cfg=None, sink=0, recent=0):
    """One Loki step per input set (reading the narrow key copy unless `narrow` is False), keeping the first
    `sink` and last `recent` keys (counted inside k)."""
    args = budget_args(k_frac, sets[0][1].shape[2], sink=sink, recent=recent)  # plain ints: no host work per call
    return [lambda q=q, k=k, v=v, ka=ka: loki_decode_attention_triton(
        q, k, v, d=d, scaling=D**-0.5, k_approx=ka[d] if narrow else None, config=cfg, workspace=WORKSPACE, **args)
        for q, k, v, ka in sets]


def loki_stages(q, k, v, k_approx, d, k_frac, cfg):
    """Callables for the stages of the split form of one step on fixed inputs: scores (from the narrow copy),
    selection, gather-attention (+ merge), and torch.topk on the same scores for comparison."""
    kk = Budget(k_frac).max_tokens(k.shape[2])
    p = check_decode(q, k, v, d, kk, None, 0, 0, None, None, "group", k_approx)
    scores = triton_scores(p, q, k_approx, None, None, cfg, WORKSPACE)
    idx = select_tokens(scores, kk, None, HKV, cfg, WORKSPACE)
    out = torch.empty_like(q)
    return (lambda: triton_scores(p, q, k_approx, None, None, cfg, WORKSPACE),
            lambda: select_tokens(scores, kk, None, HKV, cfg, WORKSPACE),
            lambda: triton_attend(p, q, k, v, idx, D**-0.5, cfg, out, WORKSPACE),
            lambda: scores.topk(kk, dim=-1, sorted=False))


def stage_times(sets, d, k_frac, cfg, n: int = 4) -> list[float]:
    """do_bench medians (ms) of the first `n` of `loki_stages`, rotating over two input sets. The stages share
    the workspace, so each set's selection reads the scores last written (same shapes: the timing is the same)."""
    stages = [loki_stages(q, k, v, ka[d], d, k_frac, cfg) for q, k, v, ka in sets[:2]]
    return [time_rotated([st[i] for st in stages]) for i in range(n)]


SWEEP_SHAPES = [(1, 4096), (16, 4096), (1, 16384), (16, 16384), (8, 65536), (1, 131072)]


def sweep_configs() -> dict:
    c = LokiKernelConfig
    return {
        "default": c(),
        "no fused kernel": c(fused_max_seq=0),
        "fused up to 16k": c(fused_max_seq=16384),
        "fused, 8 warps": c(fused_warps=8),
        "fused, scores tile 64": c(block_n_fused=64),
        "fused, scores tile 256": c(block_n_fused=256),
        "fused, attention tile 32": c(block_n_fused_attn=32),
        "one-program select up to 32k at any B": c(select_kernel_min_rows_per_sm=0),
        "multi-program select always": c(select_kernel_max_seq=0),
        "multi select tile 2048": c(multi_select_block=2048),
        "multi select sample 2048": c(multi_select_sample=2048),
        "multi select 8 warps": c(multi_select_warps=8),
        "multi select <= 64 chunks a row": c(multi_select_max_chunks=64),
        "scores tile 128": c(block_n_scores=128),
        "scores tile 256": c(block_n_scores=256),
        "attend tile 64": c(block_n_attn=64),
        "attend 4 warps": c(attn_warps=4),
        "8 programs per SM": c(programs_per_sm=8),
    }


def sweep(configs, shapes):
    print("## launch-configuration sweep, (d, k) = (0.25, 0.25): Loki step ms (do_bench medians, narrow key copy)")
    print("| config | " + " | ".join(f"B={b} S={s}" for b, s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    data = {name: {} for name in configs}
    for b, s in shapes:
        sets = make_sets(b, s)[:2]
        for name, cfg in configs.items():
            data[name][f"{b}x{s}"] = guarded(time_rotated, loki_fns(sets, num_dims(0.25, D), 0.25, cfg=cfg))
        del sets
        torch.cuda.empty_cache()
    for name in configs:
        print(f"| {name} | " + " | ".join(f"{data[name][f'{b}x{s}']:.4f}" for b, s in shapes) + " |")
    print()
    return data


def host_costs(cfg) -> dict:
    """Host (CPU) microseconds per call of each piece where the GPU work is small (B=1; by default the step at
    S=4096 is the fused kernel, at 8192 scores + one-program select + attention, at 16384 scores + multi-program
    select + attention)."""
    items = {}
    d = num_dims(0.25, D)
    for s in HOST_SEQS:
        q, k, v = random_cache(1, s, torch.bfloat16)
        ka = narrow_copy(k, d)
        items[f"Loki step S={s}"] = lambda q=q, k=k, v=v, ka=ka, args=budget_args(0.25, s): loki_decode_attention(
            q, k, v, d=d, scaling=D**-0.5, k_approx=ka, workspace=WORKSPACE, **args)
        if s == HOST_SEQS[0]:
            items["SDPA flash (packed)"] = sdpa_forms(q, k, v)["flash-packed"]
            items["argument checks"] = lambda q=q, k=k, v=v, ka=ka: check_decode(q, k, v, d, 1024, None, 0, 0, None,
                                                                                 None, "group", ka)
            items["torch.empty"] = lambda: torch.empty(8, 4096, device=DEVICE)
        if s == HOST_SEQS[-1]:
            stages = loki_stages(q, k, v, ka, d, 0.25, cfg)
            items.update({"scores stage": stages[0], "select stage": stages[1], "attend stage": stages[2],
                          "torch.topk": stages[3]})
    costs = {}
    for name, fn in items.items():
        for _ in range(HOST_REPS // 10):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(HOST_REPS):
            fn()
        costs[name] = (time.perf_counter() - start) / HOST_REPS * 1e6
        torch.cuda.synchronize()
    print(f"## host cost per call (B=1, S in {HOST_SEQS}; microseconds of CPU time, or of GPU time where that is "
          "longer)")
    print(" | ".join(f"{name}: {us:.1f}" for name, us in costs.items()) + "\n")
    return costs


def best_sdpa(sets):
    """(form, ms, callables) of the fastest SDPA form on these inputs."""
    best = None
    for form in sdpa_forms(*sets[0][:3]):
        try:
            fns = [sdpa_forms(q, k, v)[form] for q, k, v, _ in sets]
            t = time_rotated(fns)
        except RuntimeError:  # backend does not take this form
            continue
        if best is None or t < best[1]:
            best = (form, t, fns)
    return best


def table(cfg, bandwidth, batches, seqs, settings, sink=0, recent=0):
    """The SDPA-vs-Loki table; with sink or recent, each setting also timed with that protection at the same k."""
    protect = sink > 0 or recent > 0
    print("## decode step: SDPA vs Loki (bf16, 32 q heads, 8 KV heads, D = 128); ms are do_bench medians")
    print("| B | S | d_f | k_f | SDPA ms (form) | Loki ms | speedup | Loki w/o narrow copy ms | "
          f"Loki sink {sink} + recent {recent} ms (/ plain) | "
          "back-to-back SDPA / Loki ms (speedup) | graph SDPA / Loki ms (speedup) | graph Loki protected ms | "
          "Loki eff. TB/s | floor full / Loki ms | form | scores / top-k / attend ms | top-k share | torch.topk ms | "
          "dense step ms / graph ms (vs SDPA) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for b, s in itertools.product(batches, seqs):
        sets = make_sets(b, s)
        form, t_sdpa, sdpa_fns = best_sdpa(sets)
        b2b_sdpa, graph_sdpa = time_back_to_back(sdpa_fns), guarded(time_graph, sdpa_fns)
        dense_fns = [lambda q=q, k=k, v=v: dense_decode_attention_triton(q, k, v, scaling=D**-0.5,
                                                                         workspace=WORKSPACE)
                     for q, k, v, _ in sets]  # the step where the budget keeps every key (e.g. under min_tokens)
        t_dense, graph_dense = time_rotated(dense_fns), guarded(time_graph, dense_fns)
        full_bytes = 2 * b * HKV * s * D * 2
        for i, (d_frac, k_frac) in enumerate(settings):
            d = num_dims(d_frac, D)
            k = Budget(k_frac).max_tokens(s)
            fns = loki_fns(sets, d, k_frac)
            t_loki = time_rotated(fns)
            t_wide = time_rotated(loki_fns(sets, d, k_frac, narrow=False)) if i == 0 else float("nan")
            guarded_fns = loki_fns(sets, d, k_frac, sink=sink, recent=recent) if protect else None
            t_prot = time_rotated(guarded_fns) if protect else float("nan")
            graph_prot = guarded(time_graph, guarded_fns) if protect else float("nan")
            b2b_loki, graph_loki = time_back_to_back(fns), guarded(time_graph, fns)
            stages = stage_times(sets, d, k_frac, cfg)
            split = "1-prog select" if one_program_select(b * HKV, s, cfg, torch.device(DEVICE)) else "multi select"
            eager, graph = ("fused" if s <= limit else split for limit in (cfg.fused_max_seq, cfg.graph_fused_max_seq))
            path = eager if eager == graph else f"{eager} (graph: {graph})"
            loki_bytes = b * HKV * (s * d + 2 * k * D) * 2
            row = dict(B=b, S=s, d_frac=d_frac, k_frac=k_frac, sdpa_form=form, sdpa_ms=t_sdpa, loki_ms=t_loki,
                       speedup=t_sdpa / t_loki, loki_wide_ms=t_wide, sink=sink, recent=recent,
                       loki_protected_ms=t_prot, graph_loki_protected_ms=graph_prot, b2b_sdpa_ms=b2b_sdpa,
                       b2b_loki_ms=b2b_loki, graph_sdpa_ms=graph_sdpa, graph_loki_ms=graph_loki,
                       loki_eff_tbs=loki_bytes / (t_loki * 1e-3) / 1e12, floor_full_ms=full_bytes / bandwidth * 1e3,
                       floor_loki_ms=loki_bytes / bandwidth * 1e3, path=path, scores_ms=stages[0],
                       select_ms=stages[1], attend_ms=stages[2], torch_topk_ms=stages[3],
                       select_share=stages[1] / t_loki, dense_ms=t_dense, graph_dense_ms=graph_dense)
            rows.append(row)
            print(f"| {b} | {s} | {d_frac} | {k_frac} | {t_sdpa:.4f} ({form}) | {t_loki:.4f} | {row['speedup']:.2f}x | "
                  f"{t_wide:.4f} | {t_prot:.4f} ({t_prot / t_loki:.3f}x) | "
                  f"{b2b_sdpa:.4f} / {b2b_loki:.4f} ({b2b_sdpa / b2b_loki:.2f}x) | "
                  f"{graph_sdpa:.4f} / {graph_loki:.4f} ({graph_sdpa / graph_loki:.2f}x) | {graph_prot:.4f} | "
                  f"{row['loki_eff_tbs']:.2f} | {row['floor_full_ms']:.4f} / {row['floor_loki_ms']:.4f} | {path} | "
                  f"{stages[0]:.4f} / {stages[1]:.4f} / {stages[2]:.4f} | {row['select_share']:.0%} | "
                  f"{stages[3]:.4f} | {t_dense:.4f} ({t_sdpa / t_dense:.2f}x) / {graph_dense:.4f} "
                  f"({graph_sdpa / graph_dense:.2f}x) |",
                  flush=True)
        del sets, sdpa_fns
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time the step under a few launch configurations")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="limit the table")
    parser.add_argument("--seqs", type=int, nargs="+", default=SEQS, help="limit the table")
    parser.add_argument("--settings", default=",".join(f"{d}:{k}" for d, k in SETTINGS),
                        help="d_frac:k_frac pairs of the table (the first is also timed without the narrow copy)")
    parser.add_argument("--sink", type=int, default=0, help="also time each setting keeping the first SINK keys")
    parser.add_argument("--recent", type=int, default=0, help="... and the last RECENT keys (counted inside k)")
    parser.add_argument("--skip-checks", action="store_true",
                        help="skip the Loki checks (after a run that checked); the dense step's check still runs")
    parser.add_argument("--no-table", action="store_true", help="skip the SDPA-vs-Loki table (e.g. sweep only)")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} ({props.multi_processor_count} SMs) | torch {torch.__version__} | triton {triton.__version__}")
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.2f} TB/s\n")
    t0 = time.time()
    ok = check_dense()  # always: it is short
    if not args.skip_checks:
        ok &= check_correctness()
    result = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_tbs=bandwidth / 1e12, correct=ok)
    print(f"(checks: {time.time() - t0:.0f} s)\n")
    cfg = LokiKernelConfig()
    if args.sweep:
        t0 = time.time()
        result["sweep"] = sweep(sweep_configs(), SWEEP_SHAPES)
        print(f"(sweep: {time.time() - t0:.0f} s)\n")
    result["host_us"] = host_costs(cfg)
    settings = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    if not args.no_table:
        t0 = time.time()
        result["table"] = table(cfg, bandwidth, args.batches, args.seqs, settings, args.sink, args.recent)
        print(f"(table: {time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
