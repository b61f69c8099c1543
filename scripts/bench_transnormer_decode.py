#!/usr/bin/env python
"""TransNormer decode speed with graphed steps against the same-size Llama with the fastest full attention
Transformers offers (static cache, forward compiled by `generate`, mode "reduce-overhead"), on a GPU.

Models: the ~123M TransNormer of `configs/transnormer/100m_gpu.yaml` (12 x 768, 12 heads) and the Llama of the same
width, depth, heads and parameter count (`matching_llama_config`), SmolLM2's 49,152-token vocabulary, random
weights, bf16. For each batch size and prompt length:
- TransNormer, graphed (`enable_graph_decoding`): the step alone (a manual loop of one-token forwards, CUDA events,
  median ms per step), and `generate` decode tokens/s = B (N - 2) / (t(N) - t(2)) (prefill and the first step,
  where the graph is captured, excluded); the same `generate` eagerly;
- Llama: `generate` decode tokens/s with a `StaticCache` (one object per shape, reset between calls) and the
  compiled forward, and with the default `DynamicCache` (eager).
Before timing: graphed TransNormer generation equals eager generation (tokens, and scores within 1e-2 relative
in bf16) on a left-padded batch.

    PYTHONPATH=. python scripts/bench_transnormer_decode.py --batches 1 8 --prompts 1024 16384 65536
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from transformers import LlamaForCausalLM, StaticCache

from hf_patch.config import load_config
from hf_patch.transnormer import TransNormerConfig, TransNormerForCausalLM, disable_graph_decoding, enable_graph_decoding
from hf_patch.transnormer.baseline import matching_llama_config
from hf_patch.transnormer.cuda_graph import decode_graphs

VOCAB = 49152  # SmolLM2's tokenizer


def build(kind: str, model_cfg: dict, max_len: int) -> torch.nn.Module:
    config = TransNormerConfig(vocab_size=VOCAB, **model_cfg)
    model = TransNormerForCausalLM(config) if kind == "transnormer" else \
        LlamaForCausalLM(matching_llama_config(config, max_position_embeddings=max_len))
    model = model.to("cuda", torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def timed_generate(model, prompt, new_tokens: int, cache=None) -> float:
    """Seconds of one greedy `generate` of exactly `new_tokens` tokens (on `cache`, reset first, when given)."""
    kwargs = {}
    if cache is not None:
        cache.reset()
        kwargs["past_key_values"] = cache
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def generate_tokens_per_s(model, prompt, new_tokens: int, repeats: int, cache=None) -> float:
    timed_generate(model, prompt, 6, cache)  # warm-up: compilation, graph capture or recording, allocator
    two = min(timed_generate(model, prompt, 2, cache) for _ in range(repeats))
    many = min(timed_generate(model, prompt, new_tokens, cache) for _ in range(repeats))
    return prompt.shape[0] * (new_tokens - 2) / (many - two)


def step_ms(model, prompt, steps: int) -> float:
    """Median ms of one graphed one-token forward after the prompt (manual loop, CUDA events)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(token, past_key_values=cache, use_cache=True)
            end.record()
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times = sorted(times[2:])  # the first step captures
    return times[len(times) // 2]


def check(model) -> None:
    """Graphed generation equals eager generation on a left-padded batch."""
    ids = torch.randint(1, VOCAB, (4, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :120] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    ref = model.generate(ids, **kwargs)
    enable_graph_decoding(model)
    out = model.generate(ids, **kwargs)
    captures = decode_graphs(model).captures
    disable_graph_decoding(model)
    err = max(((a.float() - b.float()).norm() / a.float().norm()).item() for a, b in zip(ref.scores, out.scores))
    same = torch.equal(ref.sequences, out.sequences)
    print(f"check, graphed vs eager TransNormer generation (left padding): tokens equal {same}, max relative score "
          f"difference {err:.1e}, graphs captured {captures}", flush=True)
    if not same or err > 1e-2 or captures != 1:
        raise SystemExit("graphed TransNormer steps differ from eager ones: not timing")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/transnormer/100m_gpu.yaml", help="its `model:` section is used")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 16384, 65536])
    parser.add_argument("--new-tokens", type=int, default=130)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    model_cfg = load_config(args.config)["model"]
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"model {model_cfg}, vocab {VOCAB}, bf16", flush=True)
    torch.manual_seed(0)
    tn = build("transnormer", model_cfg, 0)
    check(tn)
    llama = build("llama", model_cfg, max(args.prompts) + args.new_tokens + 8)
    rows = []
    for batch in args.batches:
        for length in args.prompts:
            t0 = time.time()
            prompt = torch.randint(1, VOCAB, (batch, length), device="cuda")
            row = dict(batch=batch, prompt=length)
            row["tn_eager_tok_s"] = generate_tokens_per_s(tn, prompt, 34, 1)
            enable_graph_decoding(tn)
            row["tn_graph_step_ms"] = step_ms(tn, prompt, 66)
            row["tn_graph_tok_s"] = generate_tokens_per_s(tn, prompt, args.new_tokens, args.repeats)
            disable_graph_decoding(tn)
            static = StaticCache(config=llama.config, max_cache_len=length + args.new_tokens)
            row["llama_static_compiled_tok_s"] = generate_tokens_per_s(llama, prompt, args.new_tokens, args.repeats,
                                                                       static)
            row["llama_compiled"] = getattr(llama, "_compiled_call", None) is not None
            del static
            torch.cuda.empty_cache()
            row["llama_dynamic_tok_s"] = generate_tokens_per_s(llama, prompt, 34, 1)
            best = max(row["llama_static_compiled_tok_s"], row["llama_dynamic_tok_s"])
            row["tn_graph_ms_per_token_generate"] = 1e3 * batch / row["tn_graph_tok_s"]
            row["llama_best_ms_per_token"] = 1e3 * batch / best
            row["speedup_vs_best_llama"] = row["tn_graph_tok_s"] / best
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  f"({time.time() - t0:.0f} s)", flush=True)
            del prompt
            torch.cuda.empty_cache()
    print("\n| batch | prompt | TransNormer graphed step ms | TransNormer graphed generate tok/s (ms/step) | "
          "TransNormer eager generate tok/s | Llama static+compiled tok/s | Llama DynamicCache tok/s | "
          "TransNormer graphed / best Llama |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompt']} | {r['tn_graph_step_ms']:.3f} | {r['tn_graph_tok_s']:.0f} "
              f"({r['tn_graph_ms_per_token_generate']:.2f}) | {r['tn_eager_tok_s']:.0f} | "
              f"{r['llama_static_compiled_tok_s']:.0f} | {r['llama_dynamic_tok_s']:.0f} | "
              f"{r['speedup_vs_best_llama']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
