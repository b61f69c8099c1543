"""End-to-end decode speed of `model.generate` on a whole model (all 32 layers of Llama-3-8B shape), Loki against
the best full attention in the same run, each row beside its bandwidth floor (the roofline), on a GPU.

The model: random weights, bf16, built on the GPU (no CPU initialization); 32 q heads, 8 KV heads, D = 128,
hidden 4096, MLP 14336, Llama-3's vocabulary (128,256) unless --vocab says otherwise. For each context S and batch B
(1 and the largest that fits, `--batches 1 max`: estimated from free memory, capped by --max-batch; what does not
fit is skipped with a printed line), each attention's cache is filled once with the first S - 1 prompt tokens
(chunks of --prefill-chunk tokens per sequence, so that prefill activations stay small beside the cache), then
`generate` runs from it (the last prompt token, then the new ones) and the cache is cropped back after each call.
Decode tokens/s = B * (N - 2) / (t(N) - t(2)), best of --repeats, as scripts/bench_loki_generate.py times it.

Attention:
- full, `DynamicCache` (eager SDPA), the unpatched model;
- full, hf-patch's in-place cache with graphed steps and the split-K dense decode kernel (`patch_loki(...,
  k_frac=1, sink/recent 0, dense_layers 0, cuda_graph=True)`: every step keeps every key);
- Loki, the default budget (`patch_loki(model, basis, cuda_graph=True)`), and fixed key budgets (`k_tokens`,
  --k-tokens, with k_frac 1) when this hf-patch's `patch_loki` takes them;
- optional (--compile): a static cache with the forward compiled by `generate` (slow to compile at full depth).
Every graphed variant runs twice: with the whole-step loop (`DecodeGraphs.whole_step`: token choice and stop check
in the graph, no read of the device per token) and without (Transformers' loop over the graphed forward).

Roofline, per row: the bytes one decode step reads at context S: the weights (every parameter but the input
embeddings, of which only B rows are read, and the LM head, counted apart), the LM head, and the KV cache: per layer
that attends densely B * H_kv * S * D * 2 (K and V) * 2 bytes (bf16); per Loki layer B * H_kv * (S * d' + 2 * k * D)
* 2 bytes (the narrow copy of the first d' rotated key dims for the approximate scores, then K and V of the k kept keys;
the selection's scratch left out). Floor = bytes / HBM bandwidth (a device-to-device copy of 2 GiB, read + write);
achieved = floor / measured step time (B / decode tokens/s).

Before timing (at --check-context, batch --check-batch, a left-padded row): graphed Loki steps against eager ones,
the dense graphed steps against the unpatched model (teacher-forced logits), and the whole-step loop against
Transformers' loop over the same graphs (tokens equal).

    PYTHONPATH=. python scripts/bench_loki_generate_full.py --contexts 32768 --batches 1 max
    PYTHONPATH=. python scripts/bench_loki_generate_full.py --dry-run   # CPU: a 2-layer model, the table's shape
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loki_generate import check_dense_graphs, check_graphs, random_orthonormal_basis  # noqa: E402

from hf_patch import LokiCache, is_patched, patch_loki, unpatch  # noqa: E402
from hf_patch.generation import CACHE_KWARG  # noqa: E402
from hf_patch.loki.arch import loki_layers  # noqa: E402
from hf_patch.loki.cuda_graph import decode_graphs  # noqa: E402

DENSE = dict(k_frac=1.0, sink_tokens=0, recent_tokens=0, dense_layers=0, mode="decode")  # full attention, in place
HAS_K_TOKENS = "k_tokens" in inspect.signature(patch_loki).parameters
ACTIVATION_BYTES_PER_TOKEN = 2 * (3 * 14336 + 8 * 4096)  # prefill, one layer alive: MLP (3 x intermediate), the rest


# ---------------------------------------------------------------- roofline (pure Python, exercised by --dry-run)

def approx_width(dims_max: int, head_dim: int) -> int:
    """Width of the cache's narrow copy of the rotated keys (as `LokiCacheLayer` sizes it): d' rounded up to 8."""
    return min(head_dim, -(-dims_max // 8) * 8)


def layer_reads(model: torch.nn.Module | None, context: int, num_layers: int) -> list[tuple[int, int] | None]:
    """Per layer, what a decode step over `context` keys reads: None (every key: dense) or (d', k) for a Loki step
    (the approx-key width and the keys kept). `model` None (or unpatched): full attention on every layer."""
    if model is None or not is_patched(model):
        return [None] * num_layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return [None if layer.dense_step(context) else
            (approx_width(int(layer.dims.max()), head_dim), layer.budget.max_tokens(context))
            for layer in loki_layers(model)]


def kv_bytes(reads: list[tuple[int, int] | None], batch: int, context: int, kv_heads: int, head_dim: int,
             element: int = 2) -> int:
    """KV-cache bytes one decode step reads: dense layers K and V of every key, Loki layers d' dims of every key
    and K and V of the k kept ones."""
    total = 0
    for read in reads:
        per_head = 2 * context * head_dim if read is None else context * read[0] + 2 * read[1] * head_dim
        total += batch * kv_heads * per_head * element
    return total


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the weights a step reads but the LM head, bytes of the LM head): every parameter once, except the
    input embeddings (a step reads B rows of them)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    skip = {embed.data_ptr(), head.data_ptr()}
    body = sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in skip)
    return body, head.numel() * head.element_size()


def roofline(model: torch.nn.Module, patched: bool, batch: int, context: int, bandwidth: float) -> dict:
    """Bytes per decode step (weights, LM head, KV) and the floor time at `bandwidth` bytes/s."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    reads = layer_reads(model if patched else None, context, config.num_hidden_layers)
    weights, head = weight_bytes(model)
    kv = kv_bytes(reads, batch, context, config.num_key_value_heads, head_dim,
                  next(model.parameters()).element_size())  # the cache holds the model's dtype
    total = weights + head + kv
    return dict(weights_gb=weights / 1e9, lm_head_gb=head / 1e9, kv_gb=kv / 1e9, bytes_gb=total / 1e9,
                floor_ms=total / bandwidth * 1e3, loki_layers=sum(r is not None for r in reads))


def cache_bytes(config: LlamaConfig, batch: int, tokens: int, width: int, element: int = 2) -> int:
    """Bytes of a KV cache of `tokens` per sequence: K, V and (width > 0) the narrow copy of width d'."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * batch * config.num_key_value_heads * tokens * (2 * head_dim + width) * element


def memory_needed(config: LlamaConfig, batch: int, context: int, new_tokens: int, chunk: int, width: int) -> int:
    """Bytes one row needs beside the weights (one cache alive at a time): the larger cache (the in-place one with
    its narrow copy, capacity rounded to 256; or a DynamicCache plus the copy of one layer its `cat` makes), the
    prefill of a chunk (activations, the key/value heads repeated for SDPA, a float32 mask), 2 GB to spare."""
    head_dim = config.hidden_size // config.num_attention_heads
    tokens = context + new_tokens + 8
    loki = cache_bytes(config, batch, -(-tokens // 256) * 256, width)
    dynamic = cache_bytes(config, batch, tokens, 0) * (1 + 1 / config.num_hidden_layers)
    chunk = min(chunk, context)
    prefill = batch * (chunk * ACTIVATION_BYTES_PER_TOKEN + config.num_attention_heads * context * head_dim * 4
                       + chunk * context * 4)
    return int(max(loki, dynamic) + prefill + 2e9)


def largest_batch(config: LlamaConfig, context: int, new_tokens: int, chunk: int, width: int, free: int,
                  cap: int) -> int:
    """The largest batch <= cap whose `memory_needed` fits in `free` bytes (0: not even 1)."""
    return max([b for b in range(1, cap + 1) if memory_needed(config, b, context, new_tokens, chunk, width) <= free],
               default=0)


def print_table(rows: list[dict]) -> None:
    print("| batch | context | attention | whole-step loop | decode tokens/s | step ms | vs best full | "
          "GB/step (weights + LM head + KV) | floor ms | achieved |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['name']} | {r['loop']} | {r['tps']:.1f} | {r['step_ms']:.2f} | "
              f"{r['ratio']:.2f}x | {r['bytes_gb']:.4g} ({r['weights_gb']:.4g} + {r['lm_head_gb']:.4g} + "
              f"{r['kv_gb']:.4g}) | {r['floor_ms']:.4g} | {r['floor_ms'] / r['step_ms']:.2f} |")


# ---------------------------------------------------------------- the GPU run

def build_model(config: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model made directly on `device` in `dtype` (random weights initialized there)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.eos_token_id = None  # every generation runs its full length
    model.generation_config.pad_token_id = 0
    return model


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write), median of 20."""
    x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del x, y
    return 2 * (1 << 31) / sorted(times[2:])[len(times[2:]) // 2]


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, cache, chunk: int) -> None:
    """Fill `cache` with `prompt` [B, T] in chunks of `chunk` tokens per sequence."""
    for a in range(0, prompt.shape[1], chunk):
        model(prompt[:, a : a + chunk], **{CACHE_KWARG: cache}, logits_to_keep=1)


def crop_to(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def timed_generate(model, prompt: torch.Tensor, cache, new_tokens: int) -> float:
    """Seconds of one `generate` from a cache holding all but the last prompt token (cropped back after)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, **{CACHE_KWARG: cache})
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    crop_to(cache, prompt.shape[1] - 1)
    return elapsed


def decode_tokens_per_s(model, prompt, cache, new_tokens: int, repeats: int) -> float:
    timed_generate(model, prompt, cache, 6)  # warm-up: graph capture, compilation, allocator
    two = min(timed_generate(model, prompt, cache, 2) for _ in range(repeats))
    many = min(timed_generate(model, prompt, cache, new_tokens) for _ in range(repeats))
    return prompt.shape[0] * (new_tokens - 2) / (many - two)


def rebind(cache: LokiCache, model) -> None:
    """Point a filled LokiCache at the layers of the model's current patch (same basis, so the same rotated keys;
    same narrow-copy width): no second prefill. The prefill of mode "decode" is exact whatever the budget."""
    for cache_layer, loki in zip(cache.layers, loki_layers(model)):
        width = approx_width(int(loki.dims.max()), cache_layer._k.shape[-1])
        have = cache_layer._ka.shape[-1] if cache_layer._ka is not None else cache_layer._k.shape[-1]
        if width != have:
            raise SystemExit(f"the filled cache's narrow copy is {have} wide, this patch needs {width}")
        cache_layer.loki = loki


def check_whole_step(model, basis, context: int, batch: int, patches: list[tuple[str, dict]]) -> None:
    """Before timing: for each patch, the whole-step loop gives the tokens Transformers' loop gives over the same
    graphed forward (left padding in one row; an end-of-sequence token that row 0 generates, so rows end apart)."""
    prompt = torch.randint(1, model.config.vocab_size, (batch, context), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, : context // 3] = 0
    for name, patch in patches:
        patch_loki(model, basis, cuda_graph=True, **patch)
        runner, runs = decode_graphs(model), {}
        for loop in (False, True):
            runner.whole_step = loop
            free = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False)
            eos = int(free[0, context + 5])
            runs[loop] = (free, model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                               eos_token_id=eos))
        unpatch(model)
        same = all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))
        print(f"check, whole-step loop vs Transformers' loop ({name}, {context} x {batch}): tokens equal {same}, "
              f"with eos: lengths {runs[True][1].shape[1] - context} new", flush=True)
        if not same:
            raise SystemExit("the whole-step loop differs from Transformers' loop: not timing")


def variants(k_tokens: list[int]) -> list[tuple[str, dict]]:
    out = [("full, in-place cache + CUDA graph (dense step)", DENSE), ("loki, default budget", {})]
    if HAS_K_TOKENS:
        out += [(f"loki, k_tokens={k}", {"k_frac": 1.0, "k_tokens": k}) for k in k_tokens]
    return out


def run_shape(model, basis, batch: int, context: int, args, bandwidth: float) -> list[dict]:
    """Every attention at (batch, context): rows of the table."""
    prompt = torch.randint(1, model.config.vocab_size, (batch, context), device="cuda")
    rows, t0 = [], time.time()

    def row(name: str, loop: str, tps: float, patched: bool) -> None:
        rows.append(dict(batch=batch, context=context, name=name, loop=loop, tps=tps, step_ms=batch / tps * 1e3,
                         **roofline(model, patched, batch, context, bandwidth)))
        print(f"  {name}, whole-step loop {loop}: {tps:.1f} tokens/s ({time.time() - t0:.0f} s)", flush=True)

    cache = DynamicCache(config=model.config)
    prefill(model, prompt[:, :-1], cache, args.prefill_chunk)
    row("full, DynamicCache (eager SDPA)", "-", decode_tokens_per_s(model, prompt, cache, args.new_tokens,
                                                                     args.repeats), False)
    del cache
    torch.cuda.empty_cache()
    if args.compile:
        static = StaticCache(config=model.config, max_cache_len=context + args.new_tokens + 8)
        try:
            prefill(model, prompt[:, :-1], static, args.prefill_chunk)
            row("full, static cache + torch.compile", "-", decode_tokens_per_s(model, prompt, static,
                                                                                args.new_tokens, args.repeats), False)
        except (RuntimeError, ValueError) as error:  # optional: a release whose static cache cannot crop, ...
            print(f"  skipped: static cache + torch.compile ({type(error).__name__}: {error})", flush=True)
        del static
        torch.cuda.empty_cache()
    cache = None
    for name, patch in variants(args.k_tokens):
        patch_loki(model, basis, cuda_graph=True, **patch)
        if cache is None:
            cache = LokiCache(model, capacity=context + args.new_tokens + 8)
            prefill(model, prompt[:, :-1], cache, args.prefill_chunk)
        else:
            rebind(cache, model)
        for loop in (False, True):
            decode_graphs(model).whole_step = loop
            row(name, "on" if loop else "off",
                decode_tokens_per_s(model, prompt, cache, args.new_tokens, args.repeats), True)
        unpatch(model)
    del cache, prompt
    torch.cuda.empty_cache()
    best = max(r["tps"] for r in rows if r["name"].startswith("full"))
    for r in rows:
        r["ratio"] = r["tps"] / best
    return rows


def shapes(args, model, free: int) -> list[tuple[int, int]]:
    """(batch, context) rows to run; prints those that do not fit."""
    out = []
    width = approx_width(max(1, round(0.25 * 128)), 128)
    for context in args.contexts:
        cap = largest_batch(model.config, context, args.new_tokens, args.prefill_chunk, width, free, args.max_batch)
        for b in dict.fromkeys(cap if b == "max" else int(b) for b in args.batches):
            need = memory_needed(model.config, b or 1, context, args.new_tokens, args.prefill_chunk, width)
            if b == 0 or need > free:
                print(f"skipped: batch {b or 1} at {context} needs about {need / 1e9:.1f} GB beside the weights, "
                      f"{free / 1e9:.1f} GB free", flush=True)
            else:
                out.append((b, context))
    return out


def dry_run(args) -> None:
    """CPU: a 2-layer model of tiny shape, patched as the GPU run patches it; the table with the roofline columns
    (bandwidth 1e12 B/s) and made-up timings (1,000 tokens/s) to show its shape."""
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096)
    model = build_model(config, "cpu", torch.float32)
    basis = random_orthonormal_basis(2, 2, 16)
    rows = []
    for context in (1024, 2048):
        for batch in (1, 2):
            rows.append(dict(batch=batch, context=context, name="full, DynamicCache (eager SDPA)", loop="-",
                             tps=1000.0, **roofline(model, False, batch, context, 1e12)))
            for name, patch in variants(args.k_tokens):
                patch_loki(model, basis, cuda_graph=True, **{**patch, "dense_layers": 0} if patch != DENSE else patch)
                for loop in ("off", "on"):
                    rows.append(dict(batch=batch, context=context, name=name, loop=loop, tps=1000.0,
                                     **roofline(model, True, batch, context, 1e12)))
                unpatch(model)
    for r in rows:
        r["step_ms"], r["ratio"] = r["batch"] / r["tps"] * 1e3, 1.0
    print(f"dry run (CPU, 2 tiny layers; k_tokens in patch_loki: {HAS_K_TOKENS})")
    print_table(rows)
    fit = [largest_batch(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256), s,
                         args.new_tokens, args.prefill_chunk, 32, int(64e9), args.max_batch) for s in args.contexts]
    print("largest batch in 64 GB beside the weights, full depth:", dict(zip(args.contexts, fit)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--batches", nargs="+", default=["1", "max"], help="batch sizes; 'max': the largest that fits")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--k-tokens", type=int, nargs="*", default=[2048])
    parser.add_argument("--check-context", type=int, default=2048)
    parser.add_argument("--check-batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time a static cache + torch.compile (slow)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="CPU: a tiny model, the table's shape")
    args = parser.parse_args()
    if args.dry_run:
        dry_run(args)
        return
    t0 = time.time()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=args.vocab,
                         max_position_embeddings=max(args.contexts) + args.new_tokens + 16)
    model = build_model(config, "cuda", torch.bfloat16)
    basis = random_orthonormal_basis(args.layers, 8, 128)
    print(f"model built in {time.time() - t0:.0f} s: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"parameters; k_tokens in patch_loki: {HAS_K_TOKENS}", flush=True)
    if not args.skip_checks:
        check_graphs(model, basis, args.check_context, args.check_batch, 0.25, 0.25)
        check_dense_graphs(model, basis, args.check_context, args.check_batch)
        check_whole_step(model, basis, args.check_context, args.check_batch,
                         [("dense", DENSE), ("default budget", {})])
        print(f"checks done ({time.time() - t0:.0f} s)", flush=True)
    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    print(f"device-to-device copy bandwidth {bandwidth / 1e12:.2f} TB/s; {free / 1e9:.1f} GB free", flush=True)
    rows = []
    for batch, context in shapes(args, model, free):
        print(f"B={batch}, context {context}:", flush=True)
        try:
            rows += run_shape(model, basis, batch, context, args, bandwidth)
        except torch.cuda.OutOfMemoryError:
            print(f"skipped: B={batch}, context {context} ran out of memory", flush=True)
            if is_patched(model):
                unpatch(model)
        torch.cuda.empty_cache()  # after the handler: the traceback no longer holds the row's caches
    import transformers

    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{args.layers} layers of Llama-3-8B shape, vocab {args.vocab}, bf16 | {args.new_tokens - 2} decode steps "
          f"timed, best of {args.repeats} | copy bandwidth {bandwidth / 1e12:.2f} TB/s | {time.time() - t0:.0f} s")
    print_table(rows)
    if not math.isfinite(bandwidth):
        raise SystemExit("bandwidth not measured")


if __name__ == "__main__":
    main()
