"""End-to-end decode speed of `model.generate` with and without Loki, against the fastest full attention
Transformers offers, on a GPU.

A random-weight Llama-architecture model with Llama-3-8B layer shapes (32 q heads, 8 KV heads, D = 128,
hidden 4096, MLP 14336) and a few layers, bf16. For each batch size and context length: prefill + N new tokens;
decode tokens/s = B * (N - 2) / (t(N) - t(2)), so prefill and the first decode step (where graphs are captured)
are excluded. Full attention three ways:
- transformers' default `DynamicCache`, eager (SDPA);
- a static cache (`StaticCache`, one object per shape, reset between calls) with the forward compiled by
  `generate` itself, as Transformers documents for fast generation (`torch.compile`, mode "reduce-overhead":
  CUDA graphs; SDPA over the whole static cache with a mask);
- hf-patch's in-place cache with every decode step replayed as a hand-captured CUDA graph and exact attention by
  the split-K dense decode kernel over each sequence's valid keys (`patch_loki(..., k_frac=1, cuda_graph=True)`:
  a budget that keeps every key runs only the dense step; the keys sit in the PCA basis, an orthonormal rotation,
  which changes no score).
Loki (each setting) with its in-place cache and CUDA graphs (eagerly too with --eager). The speedup column is
against the best full-attention variant of the same shape. The first decode step's extra time with graphs
(warm-up and capture) is printed too. Before timing, graphed Loki steps are checked against eager ones, and the
dense graphed steps, teacher-forced with the unpatched model's greedy tokens, against its logits.

    PYTHONPATH=. python scripts/bench_loki_generate.py --layers 4 --batches 1 8 --contexts 8192 16384 32768
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from hf_patch import LokiCache, PCABasis, patch_loki, unpatch
from hf_patch.loki.cuda_graph import decode_graphs


def random_orthonormal_basis(layers: int, heads: int, dim: int) -> PCABasis:
    components = torch.linalg.qr(torch.randn(layers, heads, dim, dim, dtype=torch.float64))[0].float()
    eigenvalues = torch.linspace(1, 0.01, dim).expand(layers, heads, dim).clone()
    return PCABasis(components, eigenvalues, torch.zeros(layers, heads, dim), {"rotary": "pre", "model_id": "random"})


def timed_generate(model, prompt, mask, new_tokens: int, cache_factory=None, **kwargs) -> float:
    """Seconds of one `generate` call (a fresh cache from `cache_factory(capacity)` when given)."""
    if cache_factory is not None:
        kwargs["past_key_values"] = cache_factory(prompt.shape[1] + new_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_tokens_per_s(model, prompt, mask, new_tokens: int, repeats: int, **kwargs) -> float:
    timed_generate(model, prompt, mask, 6, **kwargs)  # warm-up (compilation, CUDA-graph recording, allocator)
    two = min(timed_generate(model, prompt, mask, 2, **kwargs) for _ in range(repeats))
    many = min(timed_generate(model, prompt, mask, new_tokens, **kwargs) for _ in range(repeats))
    return prompt.shape[0] * (new_tokens - 2) / (many - two)


def first_step_capture_s(model, prompt, mask, repeats: int) -> float:
    """Extra seconds of the first decode step when its graph must be captured (warm-up + capture): a generation
    of 2 new tokens after dropping the captured graph, less one that replays it."""
    graphs = decode_graphs(model)

    def two_tokens(recapture: bool) -> float:
        if recapture:
            graphs.captured = None
        return timed_generate(model, prompt, mask, 2)

    return min(two_tokens(True) for _ in range(repeats)) - min(two_tokens(False) for _ in range(repeats))


def check_graphs(model, basis, context: int, batch: int, d_frac: float, k_frac: float) -> None:
    """Before timing: graphed steps give what eager steps give (tokens equal, scores within 1e-3 relative) on a
    left-padded batch at this context, and the graph was really captured."""
    prompt = torch.randint(1, 32000, (batch, context), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, : context // 3] = 0
    runs = {}
    for graph in (False, True):
        patch_loki(model, basis, d_frac=d_frac, k_frac=k_frac, cuda_graph=graph, **PLAIN)
        runs[graph] = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True)
    captured = decode_graphs(model).captures
    unpatch(model)
    eager, graphed = runs[False], runs[True]
    err = max(((a.float() - b.float()).norm() / a.float().norm()).item() for a, b in zip(eager.scores, graphed.scores))
    same = torch.equal(eager.sequences, graphed.sequences)
    print(f"check, graphed vs eager decode steps at {context} (left padding in one row): tokens equal {same}, "
          f"max relative score difference {err:.1e}, graphs captured {captured}")
    if not same or err > 1e-3 or captured != 1:
        raise SystemExit("graphed decode steps differ from eager ones: not timing")


# Loki as the decode-kernel benchmark times it: the (d_frac, k_frac) budget alone, one selection per KV head
PLAIN = dict(mode="decode", gqa_select="group", k_rule="row", sink_tokens=0, recent_tokens=0, dense_layers=0)
FULL_GRAPH = dict(k_frac=1.0, sink_tokens=0, recent_tokens=0, dense_layers=0, mode="decode", cuda_graph=True)


def check_dense_graphs(model, basis, context: int, batch: int) -> None:
    """Before timing: the full-attention graphed steps (hf-patch, k_frac = 1), teacher-forced with the unpatched
    model's greedy tokens (a random model's near-tied logits would let free-running generations part on rounding),
    give the unpatched model's logits at every step within 3e-2 relative (bf16, another summation order)."""
    prompt = torch.randint(1, 32000, (batch, context), device="cuda")
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    patch_loki(model, basis, **FULL_GRAPH)
    cache = LokiCache(model, capacity=context + 16)
    errs = []
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        for i, want in enumerate(ref.scores):
            errs.append(((logits.float() - want.float()).norm() / want.float().norm()).item())
            logits = model(ref.sequences[:, context + i, None], past_key_values=cache).logits[:, -1]
    captured = decode_graphs(model).captures
    unpatch(model)
    print(f"check, dense graphed steps vs the unpatched model at {context} x {batch} (teacher-forced): relative "
          f"logit difference per step {' '.join(f'{e:.1e}' for e in errs)}, graphs captured {captured}")
    if max(errs) > 3e-2 or captured != 1:
        raise SystemExit("dense graphed steps differ from full attention: not timing")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=129)  # graphed steps are fast: a long window vs prefill noise
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="0.25:0.25")
    parser.add_argument("--eager", action="store_true", help="also time Loki without CUDA graphs")
    parser.add_argument("--skip-checks", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=max(args.contexts) + args.new_tokens + 8)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    basis = random_orthonormal_basis(args.layers, 8, 128)
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    if not args.skip_checks:
        check_graphs(model, basis, args.contexts[0], max(args.batches), *settings[0])
        check_dense_graphs(model, basis, args.contexts[0], max(args.batches))
    rows, capture_ms = [], {}
    for batch in args.batches:
        for context in args.contexts:
            t0 = time.time()
            prompt = torch.randint(1, 32000, (batch, context), device="cuda")
            mask = torch.ones_like(prompt)
            full = {"full, DynamicCache (eager SDPA)": decode_tokens_per_s(model, prompt, mask, args.new_tokens,
                                                                            args.repeats)}
            static = StaticCache(config=model.config, max_cache_len=context + args.new_tokens)
            full["full, static cache + torch.compile reduce-overhead"] = decode_tokens_per_s(
                model, prompt, mask, args.new_tokens, args.repeats, cache_factory=lambda n: (static.reset(), static)[1])
            compiled = getattr(model, "_compiled_call", None) is not None
            patch_loki(model, basis, **FULL_GRAPH)
            full["full, in-place cache + CUDA graph (hf-patch dense step)"] = decode_tokens_per_s(
                model, prompt, mask, args.new_tokens, args.repeats)
            unpatch(model)
            best_name = max(full, key=full.get)
            for name, tps in full.items():
                rows.append((batch, context, name, tps, tps / full[best_name]))
            for d_frac, k_frac in settings:
                name = f"loki d={d_frac:g} k={k_frac:g}"
                for graph in [False, True] if args.eager else [True]:
                    patch_loki(model, basis, d_frac=d_frac, k_frac=k_frac, cuda_graph=graph, **PLAIN)
                    tps = decode_tokens_per_s(model, prompt, mask, args.new_tokens, args.repeats)
                    rows.append((batch, context, name + (", CUDA graph" if graph else ", eager"), tps,
                                 tps / full[best_name]))
                    if graph:
                        capture_ms[(batch, context, name)] = 1e3 * first_step_capture_s(model, prompt, mask, 1)
                unpatch(model)
            print(f"(B={batch}, context {context}: best full = {best_name}; generate compiled the static-cache "
                  f"forward: {compiled}; {time.time() - t0:.0f} s)", flush=True)
            for row in rows[-(3 + len(settings) * (2 if args.eager else 1)):]:
                print("  ", row, flush=True)
            del prompt, mask
            torch.cuda.empty_cache()
    import transformers

    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{args.layers} layers of 8B shape, bf16, {args.new_tokens - 2} decode steps timed, best of {args.repeats}")
    print("| batch | context | attention | decode tokens/s | vs best full |\n|---|---|---|---|---|")
    for batch, context, name, tps, ratio in rows:
        print(f"| {batch} | {context} | {name} | {tps:.1f} | {ratio:.2f}x |")
    for (batch, context, name), ms in capture_ms.items():
        print(f"first decode step of a fresh cache, {name} at B={batch}, {context}: +{ms:.1f} ms (warm-up, capture)")


if __name__ == "__main__":
    main()
