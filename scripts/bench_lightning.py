"""Lightning Attention-2 on a GPU: check the Triton kernels against float64, then time them against baselines.

Usage (GPU machine; baselines from wheels, see BENCHMARKS.md)::

    PYTHONPATH=. python3 scripts/bench_lightning.py [--out DIR] [--checks all|short|long|none] [--sweep] [--ns 1024,131072]

(a) Outputs and all gradients (q, k, v, initial state) of ``lightning_attn`` vs the float64 chunked PyTorch form,
    fresh random inputs per case; several lengths (non-multiples of the block, >= 64k), strong and weak decay,
    float32 and bfloat16. Fails loudly above 1e-5 (float32) / 1e-2 (bfloat16) or on NaN.
(b) 16 heads x D = 128, bf16, 131072 tokens per call, n = 1k..128k: SDPA-flash, the official kernel (PyPI
    ``lightning-attn``), fla's ``chunk_simple_gla`` with the same decay (PyPI ``fla-core``) and ours, forward and
    forward+backward, median ms via ``triton.testing.do_bench``. A missing baseline prints n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from hf_patch.kernels import lightning_attn, lightning_attn_chunked
from hf_patch.kernels.lightning import LightningConfig, lightning_attn_triton

TOKENS = 131072
HEADS = 16
DIM = 128


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double()
    if torch.isnan(x).any():
        return float("nan")
    return ((x - ref.double()).norm() / ref.double().norm()).item()


def check_case(name, batch, seq_len, heads, dim_k, dim_v, decay, dtype, cu=None, init=True):
    """One fresh random case: rel errors of o, final state and the four gradients vs float64."""
    dev = "cuda"
    num_seqs = batch if cu is None else len(cu) - 1
    q, k = (torch.randn(batch, seq_len, heads, dim_k, device=dev).to(dtype) for _ in range(2))
    v = torch.randn(batch, seq_len, heads, dim_v, device=dev).to(dtype)
    s0 = torch.randn(num_seqs, heads, dim_k, dim_v, device=dev) if init else None
    cu_t = None if cu is None else torch.tensor(cu, device=dev, dtype=torch.int32)
    lam = torch.tensor(decay, device=dev, dtype=torch.float32)
    do = torch.randn(batch, seq_len, heads, dim_v, device=dev).to(dtype)
    dfin = torch.randn(num_seqs, heads, dim_k, dim_v, device=dev)
    inputs = [x for x in (q, k, v, s0) if x is not None]

    def grads(fn, cast):
        state_cast = torch.float64 if cast == torch.float64 else torch.float32
        xs = [x.detach().to(cast if i < 3 else state_cast).requires_grad_() for i, x in enumerate(inputs)]
        qq, kk, vv = xs[:3]
        o, fin = fn(qq, kk, vv, lam.to(state_cast),
                    xs[3] if init else None, True, cu_t)
        loss = (o.double() * do.double()).sum() + (fin.double() * dfin.double()).sum()
        loss.backward()
        return [o.detach(), fin.detach()] + [x.grad for x in xs]

    t0 = time.time()
    ours = grads(lightning_attn, dtype)
    torch.cuda.synchronize()
    t1 = time.time()
    ref = grads(lightning_attn_chunked, torch.float64)
    torch.cuda.synchronize()
    t2 = time.time()
    errs = [rel(a, b) for a, b in zip(ours, ref)]
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    ok = all(e < limit for e in errs)  # NaN compares False
    labels = ["o", "S_T", "dq", "dk", "dv"] + (["dS0"] if init else [])
    print(f"{'ok  ' if ok else 'FAIL'} {name:40s} " + " ".join(f"{l}={e:.1e}" for l, e in zip(labels, errs))
          + f"  ({t1 - t0:.1f}s ours, {t2 - t1:.1f}s ref)", flush=True)
    return ok, dict(name=name, dtype=str(dtype), errors=dict(zip(labels, errs)))


def run_checks(long: bool, deadline: float):
    """Short cases (long=False) or the T >= 64k cases; stops starting cases past the deadline."""
    strong = [0.05, 0.5, 0.8, 0.9]
    weak = [1.0, 0.9999, 0.999, 0.99]
    results, all_ok = [], True
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        if long:
            cases = [
                (f"{tag} B=1 T={65573 if tag == 'fp32' else 131072} decay 1 and 0.5", 1,
                 65573 if tag == "fp32" else 131072, 2, 128, 128, [1.0, 0.5], None),
            ]
        else:
            cases = [
                (f"{tag} B=80 T=333 strong (one segment)", 80, 333, 4, 128, 128, strong, None),
                (f"{tag} B=2 T=1000 weak", 2, 1000, 4, 128, 128, weak, None),
                (f"{tag} B=1 T=4133 weak D=64 E=96", 1, 4133, 4, 64, 96, weak, None),
                (f"{tag} varlen N=4 T=9000 strong", 1, 9000, 4, 128, 128, strong, [0, 1, 3001, 3064, 9000]),
            ]
        for name, b, t, h, d, e, lam, cu in cases:
            if time.time() > deadline:
                print(f"skipped (deadline): {name}", flush=True)
                continue
            ok, res = check_case(name, b, t, h, d, e, lam[:h], dtype, cu)
            all_ok &= ok
            results.append(res)
    return all_ok, results


def alibi_decay(heads: int) -> torch.Tensor:
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
    return torch.exp(-slopes)


def make_impls(decay: torch.Tensor):
    """name -> (make_inputs(n), fn(*inputs)) ; a missing baseline maps to None."""
    impls = {}
    log_decay = torch.log(decay).cuda()

    def bthd(n):
        b = TOKENS // n
        return [torch.randn(b, n, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def bhtd(n):
        b = TOKENS // n
        return [torch.randn(b, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    lam = decay.cuda()
    impls["ours"] = (bthd, lambda q, k, v: lightning_attn(q, k, v, lam)[0])
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        impls["fla"] = (bthd, lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=log_decay, scale=1.0)[0])
    except Exception as exc:  # noqa: BLE001 - any import failure means "baseline missing"
        print(f"fla-core unavailable: {exc!r}")
        impls["fla"] = None
    try:
        from lightning_attn.ops import lightning_attn_func

        slope = (-log_decay).float().reshape(HEADS, 1, 1).contiguous()
        impls["official"] = (bhtd, lambda q, k, v: lightning_attn_func(q, k, v, slope))
    except Exception as exc:  # noqa: BLE001
        print(f"lightning-attn unavailable: {exc!r}")
        impls["official"] = None

    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls["sdpa"] = (bhtd, sdpa)
    return impls


def time_impl(make, fn, n):
    """Median ms of the forward (no grad) and forward+backward at length n; None on failure."""
    try:
        q, k, v = make(n)
        with torch.no_grad():
            fwd = do_bench(lambda: fn(q, k, v), warmup=10, rep=60, return_mode="median")
        for x in (q, k, v):
            x.requires_grad_()
        do = torch.randn_like(fn(q, k, v))

        def step():
            fn(q, k, v).backward(do)

        fwd_bwd = do_bench(step, warmup=10, rep=60, grad_to_none=[q, k, v], return_mode="median")
        return fwd, fwd_bwd
    except Exception as exc:  # noqa: BLE001
        print(f"  timing failed at n={n}: {exc!r}", flush=True)
        return None
    finally:
        torch.cuda.empty_cache()


def cross_check_fla(impls, decay):
    """Same inputs through ours and fla: confirms both compute the same function (bf16 rounding apart)."""
    if impls["fla"] is None:
        return
    q, k, v = impls["ours"][0](1024)
    a, b = impls["ours"][1](q, k, v), impls["fla"][1](q, k, v)
    print(f"ours vs fla, n=1024 bf16: rel diff {rel(a, b.float()):.2e}", flush=True)


def peak_memory(fn, make, n):
    q, k, v = (x.requires_grad_() for x in make(n))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(q, k, v).backward(torch.ones_like(v))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kernel_profile(make, fn, ns) -> dict:
    """GPU time per kernel (µs, summed over 10 fwd+bwd calls, per call) of ours at each n, from torch.profiler: where
    a segmented call (long sequences) spends the time that a whole-sequence call does not. The segment-state and
    segment-scan kernels are the extra passes (entry states: k, v forwards; q, do backwards)."""
    from torch.profiler import ProfilerActivity, profile

    result = {}
    for n in ns:
        q, k, v = (x.requires_grad_() for x in make(n))
        do = torch.randn_like(v)
        def step():
            for x in (q, k, v):
                x.grad = None  # as do_bench's grad_to_none: no gradient accumulation kernels in the profile
            fn(q, k, v).backward(do)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        times = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
                times[e.key[:60]] = e.self_device_time_total / 10
        result[n] = dict(sorted(times.items(), key=lambda kv: -kv[1]))
        total = sum(times.values())
        print(f"kernel profile n={n}: total {total:.0f} us per fwd+bwd", flush=True)
        for name, us in result[n].items():
            print(f"  {us:9.1f} us  {100 * us / total:5.1f} %  {name}", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    return result


def sweep(impls, decay, ns, deadline):
    """Try launch settings of our kernels at a few lengths (fwd/fwd+bwd ms); stops past the deadline."""
    lam = decay.cuda()
    settings = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    settings += [dict(segmented_num_stages=s) for s in (2, 4)]
    settings += [dict(programs_per_sm=pps) for pps in (1, 2, 8)]
    settings += [dict(min_segment=m) for m in (2048, 8192)]
    settings += [dict(state_num_warps=4)]
    for setting in settings:
        if time.time() > deadline:
            break
        config = LightningConfig(**setting)

        def ours(q, k, v, config=config):
            return lightning_attn_triton(q, k, v, lam, config=config)[0]

        row = []
        for n in ns:
            t = time_impl(impls["ours"][0], ours, n)
            row.append("fail" if t is None else f"{t[0]:.2f}/{t[1]:.2f}")
        print(f"sweep {setting} (fwd/fwd+bwd ms): " + "  ".join(f"n={n}: {r}" for n, r in zip(ns, row)), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sweep", action="store_true", help="also sweep our launch settings")
    parser.add_argument("--sweep-ns", default="8192,16384,65536,131072", help="lengths the sweep times")
    parser.add_argument("--checks", choices=["none", "short", "long", "all"], default="all",
                        help="short: T <= 9000 cases; long: T = 65573 and 131072")
    parser.add_argument("--budget", type=float, default=280, help="seconds; optional parts stop past it")
    parser.add_argument("--ns", default="1024,2048,4096,8192,16384,32768,65536,131072")
    parser.add_argument("--impls", default="ours,fla,official,sdpa", help="timed in this order, all n each")
    parser.add_argument("--profile-ns", default="", help="per-kernel GPU time of ours at these n (torch.profiler)")
    parser.add_argument("--official-ns", default="1024,4096,16384,65536,131072",
                        help="the official kernel recompiles per n: time it at these n only")
    args = parser.parse_args()
    start = time.time()
    deadline = start + args.budget
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; config {LightningConfig()}",
          flush=True)
    report = dict(device=dev, torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    out_json = os.path.join(args.out, "bench_lightning.json")

    def save():
        with open(out_json, "w") as f:
            json.dump(report, f, indent=1)

    ok, report["checks"] = True, []
    for long in (False, True):
        if args.checks in ("all", "long" if long else "short"):
            part_ok, results = run_checks(long, deadline)
            ok &= part_ok
            report["checks"] += results
            print(f"{'long' if long else 'short'} checks {'PASSED' if part_ok else 'FAILED'} at "
                  f"{time.time() - start:.0f}s", flush=True)
            save()
    decay = alibi_decay(HEADS)
    impls = make_impls(decay)
    cross_check_fla(impls, decay)
    ns = [int(x) for x in args.ns.split(",")]
    names = [n for n in args.impls.split(",") if impls.get(n) is not None]
    official_ns = {int(x) for x in args.official_ns.split(",")}
    table = {}
    for name in names:
        for n in ns:
            if name == "official" and n not in official_ns:
                continue
            t0 = time.time()
            table[(name, n)] = time_impl(*impls[name], n)
            t = table[(name, n)]
            print(f"n={n:6d} {name:8s} " + ("n/a" if t is None else f"fwd {t[0]:8.3f} ms  fwd+bwd {t[1]:8.3f} ms")
                  + f"   ({time.time() - t0:.0f}s)", flush=True)
    report["table"] = {f"{k[0]}@{k[1]}": v for k, v in table.items()}
    save()
    cols = ["sdpa", "official", "fla", "ours"]

    def cell(name, n, i):
        t = table.get((name, n))
        return "n/a" if t is None else f"{t[i]:.2f}"

    def ratio(name, n, i):
        t, o = table.get((name, n)), table.get(("ours", n))
        return "n/a" if t is None or o is None else f"{t[i] / o[i]:.2f}"

    lines = ["| n | " + " | ".join(f"{c} fwd+bwd" for c in cols) + " | " + " | ".join(f"{c} fwd" for c in cols)
             + " | fla/ours fwd+bwd | official/ours fwd+bwd | sdpa/ours fwd+bwd | fla/ours fwd | Mtok/s ours fwd+bwd |",
             "|" + "---|" * (2 * len(cols) + 6)]
    for n in ns:
        o = table.get(("ours", n))
        tput = "n/a" if o is None else f"{TOKENS / o[1] / 1e3:.1f}"
        lines.append(f"| {n} | " + " | ".join(cell(c, n, 1) for c in cols) + " | "
                     + " | ".join(cell(c, n, 0) for c in cols) + f" | {ratio('fla', n, 1)} | {ratio('official', n, 1)}"
                     f" | {ratio('sdpa', n, 1)} | {ratio('fla', n, 0)} | {tput} |")
    print("\n".join(lines), flush=True)
    for name in ("ours", "fla"):
        if name in names and time.time() < deadline:
            mib = peak_memory(impls[name][1], impls[name][0], 131072)
            report[f"peak_extra_mib_{name}"] = mib
            print(f"peak extra memory fwd+bwd n=131072 {name}: {mib:.0f} MiB", flush=True)
    if args.profile_ns:
        report["kernel_profile_us"] = kernel_profile(*impls["ours"], [int(x) for x in args.profile_ns.split(",")])
    if args.sweep:
        sweep(impls, decay, [int(x) for x in args.sweep_ns.split(",")], deadline)
    print("\n".join(lines))
    save()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
