"""One Loki decode attention step against full attention (SDPA) on the GPU: correctness first, then speed.

1. Checks the Triton path (and the PyTorch path run on the GPU) against a float64 dense reference with an explicit
   selection mask, on fresh random inputs at real sizes (relative error, NaN check, poisoned output).
2. Optionally (--sweep) times a few launch configurations on representative shapes.
3. Times SDPA (fastest of its fair forms: flash/efficient, GQA-packed or enable_gqa) and Loki at
   B in {1, 8, 16}, S in {4k, 16k, 64k, 128k}, Llama-3-8B heads (32 q, 8 KV, D = 128), bf16,
   (d_frac, k_frac) in {(0.25, 0.25), (0.25, 0.125), (0.5, 0.25)}: do_bench medians (L2 flushed by do_bench,
   inputs rotated), back-to-back steps (CPU launch cost included) and CUDA-graph replays; the stage split
   (scores, top-k selection, gather-attention), the selection's share and torch.topk on the same scores for
   comparison; effective bandwidth and the bandwidth floors; the host (CPU) cost of each piece.

    PYTHONPATH=. python scripts/bench_loki_decode.py [--sweep] [--json out.json]
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

from hf_patch.kernels import loki_decode as ld
from hf_patch.loki.budget import max_tokens, num_dims, num_tokens

HQ, HKV, D = 32, 8, 128
SETTINGS = [(0.25, 0.25), (0.25, 0.125), (0.5, 0.25)]
BATCHES, SEQS = [1, 8, 16], [4096, 16384, 65536, 131072]
ROTATE_BYTES = 512 << 20  # inputs rotated over at least this many bytes so the 50 MB L2 cannot hold them


def dense_reference(q, k, v, d, k_frac, scaling, kv_start, gqa_select):
    """Float64 Loki on the GPU as a dense masked computation: [B, Hq, D] (independent of the kernels' code)."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, dh = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.view(b, hkv, g, dh)
    dims = d.to(q.device) if isinstance(d, torch.Tensor) else torch.full((hkv,), d, device=q.device)
    keep_dims = (torch.arange(dh, device=q.device) < dims[:, None]).double()  # [Hkv, D]
    approx = torch.einsum("bjgd,bjsd->bjgs", qg * keep_dims[None, :, None], k)
    start = kv_start.long() if kv_start is not None else torch.zeros(b, dtype=torch.long, device=q.device)
    valid = torch.arange(s, device=q.device)[None, :] >= start[:, None]  # [B, S]
    approx = approx.masked_fill(~valid[:, None, None], float("-inf"))
    if gqa_select == "group":
        approx = approx.amax(2, keepdim=True).expand_as(approx)
    budget = num_tokens(s - start, k_frac)  # [B]
    order = approx.argsort(dim=-1, descending=True)
    rank_ok = torch.arange(s, device=q.device)[None, :] < budget[:, None]  # [B, S]
    selected = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, order, rank_ok[:, None, None].expand_as(order))
    logits = torch.einsum("bjgd,bjsd->bjgs", qg, k) * scaling
    probs = torch.softmax(logits.masked_fill(~selected, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bjgs,bjsd->bjgd", probs, v).reshape(b, hq, dh)


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def random_cache(b, s, dtype, capacity_extra=0):
    """q [B, Hq, D] and K, V views [:, :, :S] of a [B, Hkv, S + extra, D] buffer (as the in-place cache hands out)."""
    q = torch.randn(b, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(b, HKV, s + capacity_extra, D, device="cuda", dtype=dtype)[:, :, :s]
    v = torch.randn(b, HKV, s + capacity_extra, D, device="cuda", dtype=dtype)[:, :, :s]
    return q, k, v


def check_correctness() -> bool:
    print("## correctness vs a float64 dense reference (fresh random inputs, poisoned outputs)")
    print("| B | S | dtype | select | d | k_frac | kv_start | triton rel err | torch-path rel err | NaN |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = [
        (2, 16411, torch.bfloat16, "group", 32, 0.25, [0, 1000]),
        (2, 16411, torch.bfloat16, "query", 32, 0.25, None),
        (1, 65543, torch.float16, "group", "per-head", 0.125, None),
        (3, 4099, torch.float32, "query", 64, 0.5, [0, 17, 4000]),
        (4, 8192, torch.bfloat16, "group", 64, 0.25, None),
    ]
    ok = True
    for b, s, dtype, select, d, k_frac, start in cases:
        torch.manual_seed(b * s)
        q, k, v = random_cache(b, s, dtype, capacity_extra=300)
        d = torch.tensor([16, 24, 32, 40, 48, 32, 16, 8], dtype=torch.int32) if d == "per-head" else d
        kv_start = torch.tensor(start, device="cuda", dtype=torch.int32) if start else None
        args = dict(d=d, k_frac=k_frac, scaling=D**-0.5, kv_start=kv_start, gqa_select=select)
        ld.loki_decode_attention_triton(q, k, v, **args)  # compile first: the checked call is a warm launch
        out = torch.full_like(q, float("nan"))
        ld.loki_decode_attention_triton(q, k, v, out=out, **args)
        torch.cuda.synchronize()
        ref = dense_reference(q, k, v, **args)
        err_t = rel_err(out, ref)
        err_p = rel_err(ld.loki_decode_attention_torch(q, k, v, **args), ref)
        nan = bool(out.isnan().any())
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        ok &= err_t < tol and err_p < tol and not nan
        dd = "per-head" if isinstance(d, torch.Tensor) else d
        print(f"| {b} | {s} | {str(dtype)[6:]} | {select} | {dd} | {k_frac} | {start} | {err_t:.2e} | {err_p:.2e} "
              f"| {nan} |")
    q, k, v = random_cache(2, 4099, torch.bfloat16)
    full = ld.loki_decode_attention(q, k, v, d=D, k_frac=1.0, scaling=D**-0.5)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    err = rel_err(full, sdpa.double())
    ok &= err < 1e-2
    print(f"\nd = D, k_frac = 1 vs SDPA (bf16, B=2, S=4099): rel err {err:.2e}")
    print(f"correctness: {'PASS' if ok else 'FAIL'}\n")
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
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (t * 1e-3)


def make_sets(b, s):
    per_set = 2 * b * HKV * s * D * 2
    n = max(2, min(16, math.ceil(ROTATE_BYTES / per_set)))
    return [random_cache(b, s, torch.bfloat16) for _ in range(n)]


def loki_stages(q, k, v, d, k_frac, cfg):
    """Callables for the stages of one step on fixed inputs: scores, selection, gather-attention (+ merge), and
    torch.topk on the same scores for comparison."""
    p = ld._check(q, k, v, d, k_frac, None, "group")
    kk, _ = ld._budget(p, None)
    scores = ld.triton_scores(p, q, k, None, cfg)
    idx = ld.select_tokens(scores, kk, None, HKV, cfg)
    out = torch.empty_like(q)
    return (lambda: ld.triton_scores(p, q, k, None, cfg), lambda: ld.select_tokens(scores, kk, None, HKV, cfg),
            lambda: ld.triton_attend(p, q, k, v, idx, None, D**-0.5, cfg, out),
            lambda: scores.topk(kk, dim=-1, sorted=False))


def stage_times(sets, d, k_frac, cfg, n: int = 4) -> list[float]:
    """do_bench medians (ms) of the first `n` of `loki_stages`, rotating over two input sets."""
    stages = [loki_stages(q, k, v, d, k_frac, cfg) for q, k, v in sets[:2]]
    return [time_rotated([st[i] for st in stages]) for i in range(n)]


def sweep(configs):
    print("## launch-configuration sweep, (d, k) = (0.25, 0.25): scores / select / attend ms (do_bench medians)")
    shapes = [(1, 4096), (1, 131072), (8, 65536), (16, 16384)]
    print("| config | " + " | ".join(f"B={b} S={s}" for b, s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    data = {name: {} for name in configs}
    for b, s in shapes:
        sets = make_sets(b, s)[:2]
        for name, cfg in configs.items():
            data[name][f"{b}x{s}"] = stage_times(sets, 32, 0.25, cfg, n=3)
        del sets
        torch.cuda.empty_cache()
    for name in configs:
        print(f"| {name} | " + " | ".join("/".join(f"{t:.4f}" for t in data[name][f"{b}x{s}"]) for b, s in shapes)
              + " |")
    print()
    return data


def host_costs(cfg) -> dict:
    """Host (CPU) microseconds per call of each piece at a size where the GPU work is negligible."""
    q, k, v = random_cache(1, 4096, torch.bfloat16)
    stages = loki_stages(q, k, v, 32, 0.25, cfg)
    items = {"SDPA flash (packed)": sdpa_forms(q, k, v)["flash-packed"],
             "Loki step": lambda: ld.loki_decode_attention(q, k, v, d=32, k_frac=0.25, scaling=D**-0.5),
             "argument checks": lambda: ld._check(q, k, v, 32, 0.25, None, "group"),
             "scores stage": stages[0], "select stage": stages[1], "attend stage (2 kernels)": stages[2],
             "torch.topk": stages[3], "torch.empty": lambda: torch.empty(8, 4096, device="cuda")}
    costs = {}
    for name, fn in items.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        costs[name] = (time.perf_counter() - start) / 200 * 1e6
        torch.cuda.synchronize()
    print("## host cost per call (B=1, S=4096; microseconds of CPU time)")
    print(" | ".join(f"{name}: {us:.1f}" for name, us in costs.items()) + "\n")
    return costs


def table(cfg, bandwidth):
    print("## decode step: SDPA vs Loki (bf16, 32 q heads, 8 KV heads, D = 128); ms are do_bench medians")
    print("| B | S | d_f | k_f | SDPA ms (form) | Loki ms | speedup | back-to-back SDPA / Loki ms (speedup) | "
          "graph SDPA / Loki ms (speedup) | Loki eff. TB/s | floor full / Loki ms | scores / top-k / attend ms | "
          "top-k share | torch.topk ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for b, s in itertools.product(BATCHES, SEQS):
        sets = make_sets(b, s)
        best = None
        for form in sdpa_forms(*sets[0]):
            try:
                fns = [sdpa_forms(q, k, v)[form] for q, k, v in sets]
                t = time_rotated(fns)
            except RuntimeError:  # backend does not take this form
                continue
            if best is None or t < best[1]:
                best = (form, t, fns)
        form, t_sdpa, sdpa_fns = best
        b2b_sdpa, graph_sdpa = time_back_to_back(sdpa_fns), guarded(time_graph, sdpa_fns)
        full_bytes = 2 * b * HKV * s * D * 2
        for d_frac, k_frac in SETTINGS:
            d = num_dims(d_frac, D)
            k = max_tokens(s, k_frac)
            loki_fns = [lambda q=q, k_=k_, v=v: ld.loki_decode_attention(q, k_, v, d=d, k_frac=k_frac, scaling=D**-0.5)
                        for q, k_, v in sets]
            t_loki = time_rotated(loki_fns)
            b2b_loki, graph_loki = time_back_to_back(loki_fns), guarded(time_graph, loki_fns)
            stages = stage_times(sets, d, k_frac, cfg)
            loki_bytes = b * HKV * (s * d + 2 * k * D) * 2
            row = dict(B=b, S=s, d_frac=d_frac, k_frac=k_frac, sdpa_form=form, sdpa_ms=t_sdpa, loki_ms=t_loki,
                       speedup=t_sdpa / t_loki, b2b_sdpa_ms=b2b_sdpa, b2b_loki_ms=b2b_loki, graph_sdpa_ms=graph_sdpa,
                       graph_loki_ms=graph_loki, loki_eff_tbs=loki_bytes / (t_loki * 1e-3) / 1e12,
                       floor_full_ms=full_bytes / bandwidth * 1e3, floor_loki_ms=loki_bytes / bandwidth * 1e3,
                       scores_ms=stages[0], select_ms=stages[1], attend_ms=stages[2], torch_topk_ms=stages[3],
                       select_share=stages[1] / t_loki)
            rows.append(row)
            print(f"| {b} | {s} | {d_frac} | {k_frac} | {t_sdpa:.4f} ({form}) | {t_loki:.4f} | {row['speedup']:.2f}x | "
                  f"{b2b_sdpa:.4f} / {b2b_loki:.4f} ({b2b_sdpa / b2b_loki:.2f}x) | "
                  f"{graph_sdpa:.4f} / {graph_loki:.4f} ({graph_sdpa / graph_loki:.2f}x) | {row['loki_eff_tbs']:.2f} | "
                  f"{row['floor_full_ms']:.4f} / {row['floor_loki_ms']:.4f} | "
                  f"{stages[0]:.4f} / {stages[1]:.4f} / {stages[2]:.4f} | {row['select_share']:.0%} | {stages[3]:.4f} |",
                  flush=True)
        del sets, sdpa_fns
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time a few launch configurations first")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} ({props.multi_processor_count} SMs) | torch {torch.__version__} | triton {triton.__version__}")
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.2f} TB/s\n")
    ok = check_correctness()
    result = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_tbs=bandwidth / 1e12, correct=ok)
    cfg = ld.LokiKernelConfig()
    if args.sweep:
        always = 1 << 30  # selection kernel on every row length (default: torch.topk past 32k)
        configs = {"default": cfg,
                   "select kernel always": ld.LokiKernelConfig(select_kernel_max_seq=always),
                   "... block 4096": ld.LokiKernelConfig(select_kernel_max_seq=always, select_block=4096),
                   "... block 4096, 16 warps": ld.LokiKernelConfig(select_kernel_max_seq=always, select_block=4096,
                                                                   select_warps=16),
                   "... 4 warps": ld.LokiKernelConfig(select_kernel_max_seq=always, select_warps=4)}
        result["sweep"] = sweep(configs)
    result["host_us"] = host_costs(cfg)
    result["table"] = table(cfg, bandwidth)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
