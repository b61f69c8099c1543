"""End-to-end decode speed of `model.generate` with and without Loki (issue 3), on a GPU.

A random-weight Llama-architecture model with Llama-3-8B layer shapes (32 q heads, 8 KV heads, D = 128,
hidden 4096, MLP 14336) and a few layers, bf16. For each context length: prefill + N new tokens; decode
tokens/s = B * (N - 2) / (t(N) - t(2)), so prefill and the first decode step (where a CUDA graph is captured)
are excluded. Full attention is timed with transformers' default DynamicCache and with its static cache; Loki
with its own in-place cache (mode "decode"), which keeps a narrow copy of the first d' rotated key dims for the
decode kernel's approximate scores, each step run eagerly and replayed as a CUDA graph (`cuda_graph=True`); the
first Loki setting is also timed without that copy (`LokiCache(model, approx_keys=False)`, eager). The first
decode step's extra time with graphs (warm-up and capture) is printed too. Before timing, graphed steps are checked
against eager ones.

    PYTHONPATH=. python scripts/bench_loki_generate.py --layers 4 --batch 8 --contexts 16384 32768
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
    timed_generate(model, prompt, mask, 3, **kwargs)  # warm-up (compilation, allocator)
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
        patch_loki(model, basis, d_frac=d_frac, k_frac=k_frac, mode="decode", gqa_select="group", cuda_graph=graph)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=257)  # graphed steps are fast: a long window vs prefill noise
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="0.25:0.25,0.25:0.125,0.5:0.25")
    parser.add_argument("--no-eager", action="store_true", help="time Loki with CUDA graphs only")
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
    check_graphs(model, basis, args.contexts[0], args.batch, *settings[0])
    rows, capture_ms = [], {}
    for context in args.contexts:
        prompt = torch.randint(1, 32000, (args.batch, context), device="cuda")
        mask = torch.ones_like(prompt)
        full = decode_tokens_per_s(model, prompt, mask, args.new_tokens, args.repeats)
        static = decode_tokens_per_s(model, prompt, mask, args.new_tokens, args.repeats, cache_implementation="static")
        best_full = max(full, static)
        rows.append((context, "full (DynamicCache)", full, full / best_full))
        rows.append((context, "full (static cache)", static, static / best_full))
        for i, (d_frac, k_frac) in enumerate(settings):
            name = f"loki d={d_frac:g} k={k_frac:g}"
            for graph in [True] if args.no_eager else [False, True]:
                patch_loki(model, basis, d_frac=d_frac, k_frac=k_frac, mode="decode", gqa_select="group",
                           cuda_graph=graph)
                tps = decode_tokens_per_s(model, prompt, mask, args.new_tokens, args.repeats)
                rows.append((context, name + (", CUDA graph" if graph else ""), tps, tps / best_full))
                if graph:
                    capture_ms[(context, name)] = 1e3 * first_step_capture_s(model, prompt, mask, args.repeats)
            if i == 0 and not args.no_eager:
                patch_loki(model, basis, d_frac=d_frac, k_frac=k_frac, mode="decode", gqa_select="group")
                tps = decode_tokens_per_s(model, prompt, mask, args.new_tokens, args.repeats,
                                          cache_factory=lambda n: LokiCache(model, capacity=n, approx_keys=False))
                rows.append((context, f"{name}, no narrow key copy", tps, tps / best_full))
            unpatch(model)
        del prompt, mask
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.layers} layers of 8B shape, "
          f"batch {args.batch}, bf16, {args.new_tokens - 2} decode steps timed")
    print("| context | attention | decode tokens/s | vs best full |\n|---|---|---|---|")
    for context, name, tps, ratio in rows:
        print(f"| {context} | {name} | {tps:.1f} | {ratio:.2f}x |")
    for (context, name), ms in capture_ms.items():
        print(f"first decode step of a fresh cache, {name} at {context}: +{ms:.1f} ms (warm-up and capture)")


if __name__ == "__main__":
    main()
