"""Evaluation speed of Loki mode "all" vs full attention (issue 5), on a GPU, without lm-eval.

lm-eval scores a batch of teacher-forced sequences with one forward pass and a log-softmax over the vocabulary;
this times exactly that step for a random-weight SmolLM2-135M-shaped Llama (30 layers, 9 q / 3 KV heads, D=64,
bf16) at the shapes our tasks produce: multiple choice / cloze rows (~64-256 tokens) and perplexity windows
(~1024 tokens), plus a long one. Loki's basis is a random orthonormal one (speed does not depend on it). On CUDA,
Loki "all" runs the Triton prefill kernels (hf_patch/kernels/loki/prefill.py); the PyTorch dense path
(`loki_attention_dense`, over `loki_prefill_attention_torch`) is their reference.

Checks first:
1. kernels, one attention layer at real sizes (bf16 / fp16 / fp32, query / group selection, left / right padding,
   cached keys before the rows, poisoned output): relative error against the dense path run in float64 and
   against the dense path in the same dtype; every row keeps exactly k_b keys in the attention kernel (so both
   kernels computed the same approximate scores); the kept sets the thresholds define on the dense path's float32
   scores against the dense path's top-k (rows that differ; differences can only come from scores within float32
   rounding of each other); the selection kernel's passes over the keys per row block.
2. model, against float64: Loki with d=D, k=S equals full attention; Loki (0.25, 0.25) bf16 (kernels) vs the same
   in float64 (dense path; selections may differ where approximate scores tie within bf16 rounding); kernels vs
   the dense path in bf16, with left padding through Transformers' own masks.
Then medians of `triton.testing.do_bench`, with an SDPA anchor from SPEC.md section 2 (n=1024, 16 heads, D=128:
1.24 ms), a per-layer breakdown (SDPA, Loki kernels and their two stages, the dense path) and a small sweep of
the kernels' block sizes.

    PYTHONPATH=. python scripts/bench_eval_speed.py            # GPU; about 2-3 minutes
    PYTHONPATH=. python scripts/bench_eval_speed.py --smoke    # CPU, Triton interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU run of the kernels)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_patch import PCABasis, patch_loki, unpatch  # noqa: E402
from hf_patch.kernels.loki import prefill as lp  # noqa: E402
from hf_patch.kernels.loki.prefill_naive import protected_keys, selection_mask  # noqa: E402
from hf_patch.loki import prefill as glue  # noqa: E402
from hf_patch.loki.arch import loki_layers  # noqa: E402
from hf_patch.loki.attention import LokiLayer, loki_attention_dense, visible_keys  # noqa: E402
from hf_patch.loki.budget import Budget  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               tie_word_embeddings=True, rope_theta=100000.0)
HQ, HKV, D, D_APPROX, K_FRAC = 9, 3, 64, 16, 0.25
SHAPES = [(32, 128), (16, 256), (8, 1024), (2, 4096)]  # (batch, tokens)
SWEEP_SHAPES = [(8, 1024), (2, 4096)]
CONFIGS = {  # block_m x block_n, warps (shared by both kernels)
    "64x64 w4": lp.LokiPrefillConfig(),
    "128x64 w8": lp.LokiPrefillConfig(block_m=128, block_n=64, num_warps=8),
    "32x64 w4": lp.LokiPrefillConfig(block_m=32, block_n=64, num_warps=4),
    "64x32 w4": lp.LokiPrefillConfig(block_m=64, block_n=32, num_warps=4),
}
PLAIN, PROTECTED = Budget(K_FRAC), Budget(K_FRAC, "paper", sink_tokens=4, recent_tokens=64)
# (batch, q rows, keys, dtype, gqa_select, padding, budget); keys > rows: cached keys before the rows
KERNEL_CASES = [(2, 1024, 1024, torch.bfloat16, "query", "left", PLAIN),
                (2, 1024, 1024, torch.bfloat16, "group", "left", PLAIN),
                (2, 1024, 1024, torch.bfloat16, "group", "left", PROTECTED),
                (1, 512, 1536, torch.float16, "query", "none", PLAIN),
                (2, 777, 777, torch.float32, "group", "right", PLAIN),
                (2, 777, 777, torch.float32, "query", "right", PROTECTED)]
SMOKE_KERNEL_CASES = [(2, 40, 40, torch.bfloat16, "query", "left", PLAIN),
                      (1, 24, 56, torch.float32, "group", "none", Budget(K_FRAC, sink_tokens=2, recent_tokens=3))]


def random_basis(layers: int, heads: int, dim: int, seed: int = 0) -> PCABasis:
    g = torch.Generator().manual_seed(seed)
    components = torch.linalg.qr(torch.randn(layers, heads, dim, dim, generator=g, dtype=torch.float64))[0]
    eigenvalues = torch.linspace(1, 0.01, dim, dtype=torch.float64).expand(layers, heads, dim).clone()
    return PCABasis(components.float(), eigenvalues, torch.zeros(layers, heads, dim, dtype=torch.float64),
                    {"rotary": "pre", "model_id": "random"})


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def eval_step(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """What HFLM does per batch: logits of every position, log-softmax in float32."""
    return F.log_softmax(model(ids, attention_mask=attention_mask).logits.float(), dim=-1)


@contextlib.contextmanager
def dense_path():
    """Loki's PyTorch dense path everywhere (the kernels' dispatch answers "does not apply")."""
    real = glue.loki_prefill_forward
    glue.loki_prefill_forward = lambda *args, **kwargs: None
    try:
        yield
    finally:
        glue.loki_prefill_forward = real


def patch_all(model, basis: PCABasis, d_frac: float, k_frac: float, device: str) -> None:
    """patch_loki in mode "all"; on the CPU (--smoke) its layers run the prefill kernels too (Triton's
    interpreter)."""
    patch_loki(model, basis, d_frac=d_frac, k_frac=k_frac, mode="all")
    for layer in loki_layers(model):
        layer.prefill_kernels_on_cpu = device == "cpu"


def layer_inputs(batch: int, rows: int, keys: int, dtype, device: str, select: str = "query", pad: str = "none",
                 budget: Budget = PLAIN, seed: int = 0):
    """One attention layer: LokiLayer, q [B, Hq, T, D] (a transposed view, as Transformers passes it), k, v
    [B, Hkv, S, D] and the bool visible mask [B, 1, T, S] (None for plain causal)."""
    gen = torch.Generator().manual_seed(seed)
    layer = LokiLayer(random_basis(1, HKV, D, seed).components[0], torch.full((HKV,), D_APPROX), budget, "all", select)
    q = torch.randn(batch, rows, HQ, D, generator=gen).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(batch, HKV, keys, D, generator=gen).to(device, dtype) for _ in range(2))
    if pad == "none":
        return layer, q, k, v, None
    start = torch.zeros(batch, dtype=torch.long, device=device)
    end = torch.full((batch,), keys, device=device)
    if pad == "left":
        start[-1] = rows // 3
    else:
        end[0] = keys - rows // 5
    pos = torch.arange(keys, device=device)
    limit = torch.arange(rows, device=device)[:, None] + (keys - rows)
    mask = (pos >= start[:, None, None]) & (pos < end[:, None, None]) & (pos <= limit)
    return layer, q, k, v, mask[:, None]


FAILED: list[str] = []  # checks that failed: reported at the end, after the timings (one GPU run tells all)


def check(ok: bool, what: str) -> bool:
    if not ok:
        FAILED.append(what)
        print(f"CHECK FAILED: {what}", flush=True)
    return ok


def kernel_checks(device: str, smoke: bool) -> list[dict]:
    results = []
    for batch, rows, keys, dtype, select, pad, budget in (SMOKE_KERNEL_CASES if smoke else KERNEL_CASES):
        try:
            results.append(kernel_check(batch, rows, keys, dtype, select, pad, budget, device))
        except Exception as e:  # noqa: BLE001 - keep going to the timings
            check(False, f"kernel check B={batch} T={rows} S={keys} {dtype} {select} {pad} {budget}: {e!r}")
    return results


def kernel_check(batch: int, rows: int, keys: int, dtype, select: str, pad: str, budget: Budget, device: str) -> dict:
    layer, q, k, v, mask = layer_inputs(batch, rows, keys, dtype, device, select, pad, budget)
    scale = D**-0.5
    sink, recent = budget.sink_tokens, budget.recent_tokens
    vis = visible_keys(mask, rows, keys, q.device)
    ranges = glue.key_ranges(mask, rows, keys, batch)
    assert ranges is not False
    kb = glue.keys_per_row(layer, mask, ranges, batch, rows, keys, q.device)
    qe, qa, ka = glue.prepare(layer, q, k, False)
    out = torch.full((batch, rows, HQ, D), float("nan"), device=device, dtype=dtype)  # poisoned
    count = torch.full((batch, HQ, rows), -1, device=device, dtype=torch.int32)
    lp.loki_prefill_attention(qe, k, v, qa, ka, kb, ranges, group=select == "group", scaling=scale, sink=sink,
                              recent=recent, out=out, count=count)
    dense = loki_attention_dense(layer, q, k, v, vis, scale, False)
    ref64 = loki_attention_dense(layer, q.double(), k.double(), v.double(), vis, scale, False)

    # the thresholds on the dense path's float32 scores (protected keys kept) vs its top-k
    q_approx = layer.approx_query(layer.rotate_queries(q))  # [B, Hkv, G, T, d]
    k_approx = layer.rotate_keys(k, D_APPROX)
    scores = torch.matmul(q_approx.float(), k_approx.float()[:, :, None].transpose(-1, -2))  # [B, Hkv, G, T, S]
    vis = vis.expand(batch, -1, -1, -1)
    topk = selection_mask(scores, vis, kb, sink, recent, select == "group")
    cfg = lp.default_config(dtype)
    passes = torch.empty((batch * (HKV if select == "group" else HQ), triton.cdiv(rows, cfg.block_m)),
                         device=device, dtype=torch.int32)
    thr, pos = lp.prefill_thresholds(qa, ka, kb, ranges, select == "group", sink, recent, cfg, passes)
    scores = scores.masked_fill(~vis[:, :, None], float("-inf"))
    if select == "group":
        scores = scores.amax(2, keepdim=True)
    thr, pos = thr.view(*scores.shape[:-1], 1), pos.view(*scores.shape[:-1], 1)
    at = torch.arange(keys, device=device)
    kept = vis[:, :, None] & ((scores > thr) | ((scores == thr) & (at <= pos)))
    protected = protected_keys(vis[:, :, None], sink, recent)
    kept = kept if protected is None else kept | protected
    differ = (kept != topk).any(-1)
    result = {
        "case": f"B={batch} T={rows} S={keys} {str(dtype)[6:]} {select} pad={pad} {budget.describe()}",
        "kernels vs dense fp64": rel_err(out, ref64), "dense vs dense fp64": rel_err(dense, ref64),
        "kernels vs dense same dtype": rel_err(out, dense),
        "rows keeping exactly k_b (attention kernel)": float((count == kb[:, None]).float().mean()),
        "rows whose kept set differs from the dense top-k": int(differ.sum()), "rows": differ.numel(),
        "passes per row block mean/max": [float(passes.float().mean()), int(passes.max())],
    }
    print(json.dumps(result), flush=True)
    case = result["case"]
    check(bool(torch.isfinite(out).all()), f"{case}: non-finite output (or an unwritten poisoned element)")
    check(torch.equal(count, kb[:, None].expand_as(count)), f"{case}: the attention kernel kept another number "
          "of keys than k_b (the two kernels' approximate scores differ)")
    check(int(differ.sum()) <= max(2, differ.numel() // 1000), f"{case}: kept sets differ from the dense top-k")
    check(rel_err(out, dense) < (1e-4 if dtype == torch.float32 else 2e-2), f"{case}: kernels differ from the "
          "dense path")
    return result


def model_checks(model64, model16, basis, device: str, smoke: bool) -> dict:
    ids = torch.randint(0, SMOLLM2["vocab_size"], (2, 64 if smoke else 256), device=device)
    pad = torch.ones_like(ids)
    pad[1, : ids.shape[1] // 4] = 0  # left padding of the second row
    with torch.inference_mode():
        full64 = eval_step(model64, ids)
        patch_all(model64, basis, 1.0, 1.0, device)
        exact64 = eval_step(model64, ids)
        patch_all(model64, basis, 0.25, 0.25, device)
        loki64 = eval_step(model64, ids)
        unpatch(model64)
        full16 = eval_step(model16, ids)
        patch_all(model16, basis, 0.25, 0.25, device)
        loki16 = eval_step(model16, ids)
        calls, real = [], glue.loki_prefill_attention
        glue.loki_prefill_attention = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
        try:
            padded16 = eval_step(model16, ids, pad)  # Transformers' own padding mask -> key ranges -> kernels
        finally:
            glue.loki_prefill_attention = real
        with dense_path():
            dense16 = eval_step(model16, ids)
            padded_dense16 = eval_step(model16, ids, pad)
        unpatch(model16)
    keep = pad.bool()
    result = {"loki d=k=1 (fp64) vs full (fp64)": rel_err(exact64, full64),
              "full bf16 vs full fp64": rel_err(full16, full64),
              "loki(0.25,0.25) bf16 kernels vs loki fp64": rel_err(loki16, loki64),
              "loki(0.25,0.25) bf16 kernels vs bf16 dense path": rel_err(loki16, dense16),
              "same, left padding (valid positions)": rel_err(padded16[keep], padded_dense16[keep]),
              "layers on the kernels with left padding": f"{len(calls)} of {config_layers(model16)}",
              "loki(0.25,0.25) fp64 vs full fp64": rel_err(loki64, full64)}
    check(bool(torch.isfinite(loki16).all() and torch.isfinite(full16).all() and torch.isfinite(padded16[keep]).all()),
          "model: non-finite log-probabilities")
    check(result["loki d=k=1 (fp64) vs full (fp64)"] < 1e-5, "model: Loki d=k=1 differs from full attention")
    check(device == "cpu" or len(calls) == config_layers(model16), "model: padded batch not on the kernels")
    check(result["loki(0.25,0.25) bf16 kernels vs bf16 dense path"] < 5e-2, "model: kernels far from the dense path")
    return result


def config_layers(model) -> int:
    return model.config.num_hidden_layers


def attention_breakdown(batch: int, tokens: int, bench, device: str, configs: dict) -> dict:
    """One layer's attention, bf16, causal: SDPA vs Loki's kernels (and each stage) vs its dense path."""
    layer, q, k, v, _ = layer_inputs(batch, tokens, tokens, torch.bfloat16, device)
    scale = D**-0.5
    prepared = glue.prepare(layer, q, k, False)
    kb = glue.keys_per_row(layer, None, None, batch, tokens, tokens, q.device)
    out = torch.empty((batch, tokens, HQ, D), device=device, dtype=torch.bfloat16)
    result = {}
    with torch.inference_mode():
        result["sdpa"] = bench(lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1), is_causal=True, scale=scale))
        for name, cfg in configs.items():
            try:
                result[name] = time_config(prepared, k, v, kb, out, cfg, bench)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
                check(False, f"{batch} x {tokens} {name}: {e!r}")
                continue
            check(result[name]["exact k_b"], f"{batch} x {tokens} {name}: kept another number of keys than k_b")
        # the same k per row with the first 4 and last 64 keys always kept: what protection costs the kernels
        protected = Budget(K_FRAC, sink_tokens=4, recent_tokens=64)
        kb_protected = glue.keys_per_row(dataclasses.replace(layer, budget=protected), None, None, batch, tokens,
                                         tokens, q.device)
        result["protected"] = time_config(prepared, k, v, kb_protected, out, configs["64x64 w4"], bench, protected)
        check(result["protected"]["exact k_b"], f"{batch} x {tokens} protected: kept another number of keys than k_b")
        vis = visible_keys(None, tokens, tokens, q.device)
        result["dense"] = bench(lambda: loki_attention_dense(layer, q, k, v, vis, scale, False))
    return result


def time_config(prepared, k, v, kb, out, cfg, bench, budget: Budget = PLAIN) -> dict:
    """One block-size setting on the prepared (q, qa, ka) of a causal layer with query selection and `budget`'s
    protected keys: kernels, stage 1 and stage 2 alone (ms), passes per row block, exact k_b."""
    sink, recent = budget.sink_tokens, budget.recent_tokens
    q, qa, ka = prepared
    batch, _, tokens, _ = q.shape
    scale = D**-0.5
    passes = torch.empty((batch * HQ, triton.cdiv(tokens, cfg.block_m)), device=q.device, dtype=torch.int32)
    count = torch.empty((batch, HQ, tokens), device=q.device, dtype=torch.int32)

    def kernels(count=None):
        return lp.loki_prefill_attention(q, k, v, qa, ka, kb, None, group=False, scaling=scale, sink=sink,
                                         recent=recent, config=cfg, out=out, count=count)

    kernels(count)
    thr, pos = lp.prefill_thresholds(qa, ka, kb, None, False, sink, recent, cfg, passes)
    return {
        "kernels": bench(kernels),
        "stage 1": bench(lambda: lp.prefill_thresholds(qa, ka, kb, None, False, sink, recent, cfg)),
        "stage 2": bench(lambda: lp.prefill_attend(q, k, v, qa, ka, thr, pos, None, sink, recent, scale, cfg, out)),
        "passes mean/max": [float(passes.float().mean()), int(passes.max())],
        "exact k_b": bool(torch.equal(count, kb[:, None].expand_as(count))),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 layers, small shapes, one call per timing")
    args = parser.parse_args()

    import transformers

    device, shapes = ("cpu", [(2, 64)]) if args.smoke else ("cuda", SHAPES)

    def bench(fn) -> float:
        if args.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))

    began = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2, **({"num_hidden_layers": 2} if args.smoke else {})})
    model16 = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    model64 = LlamaForCausalLM(config).to(device, torch.float64).eval()
    model64.load_state_dict({k: v.double() for k, v in model16.state_dict().items()})
    basis = random_basis(config.num_hidden_layers, config.num_key_value_heads, 64)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "transformers": transformers.__version__}
    report["kernel checks"] = kernel_checks(device, args.smoke)
    report["checks"] = model_checks(model64, model16, basis, device, args.smoke)
    del model64
    print(json.dumps(report["checks"], indent=1), flush=True)

    aq = torch.randn(2 if args.smoke else 128, 16, 1024, 128, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        report["anchor sdpa fwd n=1024 (SPEC 1.24 ms)"] = bench(
            lambda: F.scaled_dot_product_attention(aq, aq, aq, is_causal=True))
    del aq

    rows = []
    for batch, tokens in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
        with torch.inference_mode():
            full = bench(lambda: eval_step(model16, ids))
            patch_all(model16, basis, 0.25, 0.25, device)
            loki = bench(lambda: eval_step(model16, ids))
            unpatch(model16)
        sweep = CONFIGS if (batch, tokens) in SWEEP_SHAPES else {"64x64 w4": CONFIGS["64x64 w4"]}
        layer = attention_breakdown(batch, tokens, bench, device, sweep)
        rows.append({"batch": batch, "tokens": tokens, "full ms": full, "loki ms": loki, "ratio": loki / full,
                     "tok/s full": batch * tokens / full * 1e3, "tok/s loki": batch * tokens / loki * 1e3,
                     "layer": layer})
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    report["rows"] = rows
    report["failed checks"] = FAILED
    report["seconds"] = time.perf_counter() - began
    with open(os.path.join(args.out, "bench_eval_speed.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}, "
          f"transformers {report['transformers']}; "
          f"anchor SDPA {report['anchor sdpa fwd n=1024 (SPEC 1.24 ms)']:.3f} ms; {report['seconds']:.0f} s")
    print("| B x T | full ms | Loki all (0.25, 0.25) ms | Loki / full | layer: SDPA ms | Loki kernels ms "
          "| stage 1 / stage 2 ms | passes per row block (mean / max) | Loki kernels, sink 4 + recent 64 ms (/ plain) "
          "| Loki dense path ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lay = r["layer"]
        ker = lay.get("64x64 w4", {"kernels": float("nan"), "stage 1": float("nan"), "stage 2": float("nan"),
                                   "passes mean/max": [float("nan"), 0]})
        print(f"| {r['batch']} x {r['tokens']} | {r['full ms']:.2f} | {r['loki ms']:.2f} | {r['ratio']:.2f}x | "
              f"{lay['sdpa']:.3f} | {ker['kernels']:.3f} | {ker['stage 1']:.3f} / {ker['stage 2']:.3f} | "
              f"{ker['passes mean/max'][0]:.1f} / {ker['passes mean/max'][1]} | "
              f"{lay['protected']['kernels']:.3f} ({lay['protected']['kernels'] / ker['kernels']:.3f}x) | "
              f"{lay['dense']:.3f} |")
    print("\nBlock sizes (one layer, kernels / stage 1 / stage 2 ms, exact k_b):")
    for r in rows:
        for name in CONFIGS:
            if name in r["layer"]:
                c = r["layer"][name]
                print(f"  {r['batch']} x {r['tokens']} {name}: {c['kernels']:.3f} / {c['stage 1']:.3f} / "
                      f"{c['stage 2']:.3f}, passes {c['passes mean/max'][0]:.1f}/{c['passes mean/max'][1]}, "
                      f"exact {c['exact k_b']}")

    print("\nFAILED CHECKS:\n  " + "\n  ".join(FAILED) if FAILED else "\nall checks passed")


if __name__ == "__main__":
    main()
