"""Evaluation speed of Loki mode "all" vs full attention (issue 5), on a GPU, without lm-eval.

lm-eval scores a batch of teacher-forced sequences with one forward pass and a log-softmax over the vocabulary;
this times exactly that step for a random-weight SmolLM2-135M-shaped Llama (30 layers, 9 q / 3 KV heads, D=64,
bf16) at the shapes our tasks produce: multiple choice / cloze rows (~64-256 tokens) and perplexity windows
(~1024 tokens), plus a long one. Loki's basis is a random orthonormal one (speed does not depend on it).

Checks first, against float64: Loki with d=D, k=S equals full attention; Loki (0.25, 0.25) in bf16 vs the same
in float64 (selections may differ where approximate scores tie within bf16 rounding). Then medians of
`triton.testing.do_bench`, with an SDPA anchor from SPEC.md section 2 (n=1024, 16 heads, D=128: 1.24 ms).
A per-layer breakdown times the attention function alone: SDPA, Loki's dense path, and its parts.

    PYTHONPATH=. python scripts/bench_eval_speed.py
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_patch import PCABasis, patch_loki, unpatch
from hf_patch.loki.attention import LokiLayer, loki_attention_dense, select_tokens, visible_keys

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               tie_word_embeddings=True, rope_theta=100000.0)
SHAPES = [(32, 128), (16, 256), (8, 1024), (2, 4096)]  # (batch, tokens)


def random_basis(layers: int, heads: int, dim: int, seed: int = 0) -> PCABasis:
    g = torch.Generator().manual_seed(seed)
    components = torch.linalg.qr(torch.randn(layers, heads, dim, dim, generator=g, dtype=torch.float64))[0]
    eigenvalues = torch.linspace(1, 0.01, dim, dtype=torch.float64).expand(layers, heads, dim).clone()
    return PCABasis(components.float(), eigenvalues, torch.zeros(layers, heads, dim, dtype=torch.float64),
                    {"rotary": "pre", "model_id": "random"})


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def eval_step(model, ids: torch.Tensor) -> torch.Tensor:
    """What HFLM does per batch: logits of every position, log-softmax in float32."""
    return F.log_softmax(model(ids).logits.float(), dim=-1)


def checks(model64, model16, basis, device: str) -> dict:
    ids = torch.randint(0, SMOLLM2["vocab_size"], (2, 256), device=device)
    with torch.inference_mode():
        full64 = eval_step(model64, ids)
        patch_loki(model64, basis, 1.0, 1.0, mode="all")
        exact64 = eval_step(model64, ids)
        patch_loki(model64, basis, 0.25, 0.25, mode="all")
        loki64 = eval_step(model64, ids)
        unpatch(model64)
        full16 = eval_step(model16, ids)
        patch_loki(model16, basis, 0.25, 0.25, mode="all")
        loki16 = eval_step(model16, ids)
        unpatch(model16)
    result = {"loki d=k=1 (fp64) vs full (fp64)": rel_err(exact64, full64),
              "full bf16 vs full fp64": rel_err(full16, full64),
              "loki(0.25,0.25) bf16 vs loki fp64": rel_err(loki16, loki64),
              "loki(0.25,0.25) fp64 vs full fp64": rel_err(loki64, full64)}
    assert torch.isfinite(loki16).all() and torch.isfinite(full16).all()
    assert result["loki d=k=1 (fp64) vs full (fp64)"] < 1e-5, result  # Loki's exact softmax runs in float32
    return result


def attention_breakdown(batch: int, tokens: int, bench, device: str) -> dict:
    """One layer's attention, bf16: SDPA vs Loki's dense path and two of its parts (scores+top-k, exact)."""
    hq, hkv, d = SMOLLM2["num_attention_heads"], SMOLLM2["num_key_value_heads"], 64
    q = torch.randn(batch, hq, tokens, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, hkv, tokens, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    basis = random_basis(1, hkv, d)
    layer = LokiLayer(basis.components[0].float(), torch.full((hkv,), 16), 0.25, "all", "query")
    visible = visible_keys(None, tokens, tokens, q.device)
    scale = d ** -0.5

    def sdpa():
        return F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
                                              is_causal=True, scale=scale)

    def approx_topk():
        q_rot = layer.rotate_queries(q)
        scores = torch.matmul(layer.approx_query(q_rot), layer.rotate_keys(k, 16).unsqueeze(2).transpose(-1, -2))
        return select_tokens(scores, visible, 0.25, "query")

    with torch.inference_mode():
        return {"sdpa": bench(sdpa), "loki dense": bench(lambda: loki_attention_dense(layer, q, k, v, visible, scale, False)),
                "loki scores+topk": bench(approx_topk)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 layers, small shapes, one call per timing")
    args = parser.parse_args()
    import time

    import transformers
    import triton

    device, shapes = ("cpu", [(2, 64)]) if args.smoke else ("cuda", SHAPES)

    def bench(fn) -> float:
        if args.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2, **({"num_hidden_layers": 2} if args.smoke else {})})
    model16 = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    model64 = LlamaForCausalLM(config).to(device, torch.float64).eval()
    model64.load_state_dict({k: v.double() for k, v in model16.state_dict().items()})
    basis = random_basis(config.num_hidden_layers, config.num_key_value_heads, 64)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "checks": checks(model64, model16, basis, device)}
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
            patch_loki(model16, basis, 0.25, 0.25, mode="all")
            loki = bench(lambda: eval_step(model16, ids))
            unpatch(model16)
        layer = attention_breakdown(batch, tokens, bench, device)
        rows.append({"batch": batch, "tokens": tokens, "full ms": full, "loki ms": loki, "ratio": loki / full,
                     "tok/s full": batch * tokens / full * 1e3, "tok/s loki": batch * tokens / loki * 1e3,
                     "layer": layer})
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    report["rows"] = rows
    with open(os.path.join(args.out, "bench_eval_speed.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}, "
          f"transformers {report['transformers']}; anchor SDPA {report['anchor sdpa fwd n=1024 (SPEC 1.24 ms)']:.3f} ms")
    print("| B x T | full ms | Loki all (0.25, 0.25) ms | Loki / full | layer: SDPA ms | Loki dense ms | scores+top-k ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lay = r["layer"]
        print(f"| {r['batch']} x {r['tokens']} | {r['full ms']:.2f} | {r['loki ms']:.2f} | {r['ratio']:.2f}x | "
              f"{lay['sdpa']:.3f} | {lay['loki dense']:.3f} | {lay['loki scores+topk']:.3f} |")


if __name__ == "__main__":
    main()
