#!/usr/bin/env python
"""TGS (tokens per GPU per second) of a full training step, TransNormer vs the same-size Llama (SDPA) (the Lightning
Attention-2 paper's table). Decode latency against prompt length: scripts/bench_transnormer_decode.py.

    python scripts/bench_tgs.py --config configs/transnormer/100m_gpu.yaml --out tgs.json

A training step is forward + loss + backward + AdamW step on fp32 master weights under bf16 autocast, with
`--tokens-per-step` tokens at every sequence length (batch = tokens / length). The loss is the same code for both
models: by default (`--loss fused`) `hf_patch.transnormer.CausalLMWithFusedLoss`, the fused linear + cross entropy
through the tied LM head (chunks of tokens, gradients computed in the forward, no [tokens, vocab] logits, no
recompute); `--loss checkpointed` is the earlier loss (8,192-token chunks of `F.cross_entropy` on float32 logits,
each chunk checkpointed). Before timing, the script checks the fused loss against `F.cross_entropy` in float64
(loss and gradients; float32, and bf16 autocast with float32 master weights), the TransNormer's CUDA (Triton) path
in float32 against the PyTorch chunked path in float64 (logits and gradients), its bf16-autocast step with the
Triton SRMSNorm kernels against the same step with PyTorch's `F.rms_norm`, and greedy generation with the cache
against full recompute; it stops if any disagree. Timings: `triton.testing.do_bench` medians (CUDA events); random
token ids.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_patch import kernels
from hf_patch.config import load_config
from hf_patch.kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from hf_patch.transnormer import CausalLMWithFusedLoss, TransNormerConfig, TransNormerForCausalLM
from hf_patch.transnormer.modeling_transnormer import set_norm_backend
from hf_patch.transnormer.baseline import matching_llama_config

VOCAB = 49152  # SmolLM2's tokenizer


def build(kind: str, model_cfg: dict, max_len: int, device: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = TransNormerConfig(vocab_size=VOCAB, **model_cfg)
    if kind == "transnormer":
        model = TransNormerForCausalLM(config)
    else:
        model = LlamaForCausalLM(matching_llama_config(config, max_position_embeddings=max_len))
    return model.to(device)


def chunked_lm_loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """The earlier benchmark loss (`--loss checkpointed`): mean next-token cross entropy of hidden [B, T, C] through
    head [V, C], float32 logits one checkpointed chunk at a time (so the backward recomputes them)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    piece = lambda a, b: F.cross_entropy((a @ head.T).float(), b, reduction="sum")  # noqa: E731
    total = sum(checkpoint(piece, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / y.numel()


def train_step_fn(model, optimizer, ids: torch.Tensor, loss_kind: str = "fused"):
    fused = CausalLMWithFusedLoss(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if loss_kind == "fused":
                loss = fused(ids, labels=ids).loss
            else:
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                loss = chunked_lm_loss(hidden, model.lm_head.weight, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def bench_tgs(model_cfg: dict, kinds: list[str], seq_lens: list[int], tokens_per_step: int,
              loss_kind: str) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for kind in kinds:
        model = build(kind, model_cfg, max(seq_lens), "cuda").train()
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for seq_len in seq_lens:
            batch = tokens_per_step // seq_len
            ids = torch.randint(0, VOCAB, (batch, seq_len), device="cuda")
            step = train_step_fn(model, optimizer, ids, loss_kind)
            try:
                torch.cuda.reset_peak_memory_stats()
                ms = do_bench(step, warmup=1, rep=1500, return_mode="median")
                row = {"model": kind, "params_M": round(params / 1e6, 1), "seq_len": seq_len, "batch": batch,
                       "step_ms": round(ms, 2), "tgs": round(batch * seq_len / (ms / 1e3)),
                       "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
            except torch.OutOfMemoryError:
                row = {"model": kind, "seq_len": seq_len, "batch": batch, "step_ms": None, "tgs": None, "oom": True}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ids, step
            torch.cuda.empty_cache()
        del model, optimizer
        torch.cuda.empty_cache()
    return rows


def profile_step(model_cfg: dict, seq_len: int, tokens_per_step: int, loss_kind: str, rows: int = 16) -> list[dict]:
    """GPU time of one TransNormer training step by kernel (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    model = build("transnormer", model_cfg, seq_len, "cuda").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, VOCAB, (tokens_per_step // seq_len, seq_len), device="cuda")
    step = train_step_fn(model, optimizer, ids, loss_kind)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    table = [{"kernel": e.key[:70], "ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count,
              "share": round(e.self_device_time_total / total, 3)} for e in top]
    print(f"\nprofile: one TransNormer step at seq_len {seq_len}, GPU total {total / 1e3:.1f} ms")
    for row in table:
        print(f"  {row['ms']:8.2f} ms {row['share']:6.1%} x{row['calls']:<5} {row['kernel']}")
    del model, optimizer
    torch.cuda.empty_cache()
    return table


@torch.no_grad()
def check_cuda_path(model_cfg: dict) -> dict:
    """Triton path (float32) vs the PyTorch chunked path in float64: logits and gradients of a 2-layer model; the
    same model's gradients under bf16 autocast with the Triton SRMSNorm kernels vs with `F.rms_norm` (both against
    float64); then greedy generation with the cache vs full recompute (a widely initialised model, so no near-ties)."""
    small = {**model_cfg, "num_hidden_layers": 2, "lrpe_layers": [0], "initializer_range": 0.3}
    torch.manual_seed(0)
    model = build("transnormer", small, 2048, "cuda").float()
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (2, 1000), device="cuda")  # not a multiple of any block size

    def run(net, attn):
        original = kernels.lightning_attn
        kernels.lightning_attn = attn
        try:
            out = net(ids, labels=ids, use_cache=False)
            out.loss.backward()
            return out.logits.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])
        finally:
            kernels.lightning_attn = original

    logits, grads = run(model, kernels.lightning_attn)
    ref_logits, ref_grads = run(reference, kernels.lightning_attn_chunked)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    bf16 = {}
    for backend in ("auto", "torch"):  # the SRMSNorm kernels (bf16 outputs) vs F.rms_norm, under bf16 autocast
        model.zero_grad(set_to_none=True)
        set_norm_backend(model, backend)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16[backend] = run(model, kernels.lightning_attn)[1]
        finally:
            set_norm_backend(model, "auto")
    model.eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, VOCAB, (2, 300), device="cuda")
    cached = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    recomputed = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    result = {"logits_rel_err_vs_fp64": rel(logits, ref_logits), "grad_rel_err_vs_fp64": rel(grads, ref_grads),
              "generate_cache_equals_recompute": bool(torch.equal(cached, recomputed)),
              "distinct_generated_tokens": len(set(cached[:, 300:].flatten().tolist())),
              "bf16_autocast_grad_rel_err_vs_fp64": {"triton_srmsnorm": rel(bf16["auto"], ref_grads),
                                                     "torch_rms_norm": rel(bf16["torch"], ref_grads)},
              "nan": bool(torch.isnan(logits).any() or torch.isnan(grads).any() or torch.isnan(bf16["auto"]).any())}
    print("check:", json.dumps(result), flush=True)
    bf16_err = result["bf16_autocast_grad_rel_err_vs_fp64"]
    if (result["nan"] or result["logits_rel_err_vs_fp64"] > 1e-2 or result["grad_rel_err_vs_fp64"] > 2e-2
            or bf16_err["triton_srmsnorm"] > 1.5 * bf16_err["torch_rms_norm"] + 1e-3):
        raise SystemExit(f"CUDA path disagrees with the float64 reference: {result}")
    return result


def check_fused_loss(hidden_size: int, tokens: int = 6000, chunk: int = 2500) -> dict:
    """The fused linear + cross entropy (Triton) vs `F.cross_entropy` on float64 logits, at the benchmark's head
    shape [49152, C]: loss and gradients (h, W) in float32, under bf16 autocast with float32 master weights, and in
    bfloat16; chunks not aligned with the tokens, every 7th label ignored. The reference computed at the same
    precision is reported beside it: the fused error may be at most twice its error (plus a small floor)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, hidden_size, device="cuda", generator=g)
    w = torch.randn(VOCAB, hidden_size, device="cuda", generator=g) * 0.05
    y = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=g)
    y[::7] = -100

    def run(fn, dtype, autocast):
        hh, ww = (t.to(dtype).detach().requires_grad_() for t in (h, w))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hh, ww, y, chunk_size=chunk)
        loss.backward()
        assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
        return [t.detach().double() for t in (loss, hh.grad, ww.grad)]

    exact = run(linear_cross_entropy_reference, torch.float64, False)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    results, failed = {}, []
    for name, dtype, autocast, floor in (("float32", torch.float32, False, 1e-6),
                                         ("bf16_autocast_fp32_weights", torch.float32, True, 1e-3),
                                         ("bfloat16", torch.bfloat16, False, 1e-3)):
        fused = run(fused_linear_cross_entropy, dtype, autocast)
        ref = run(linear_cross_entropy_reference, dtype, autocast)
        row = {}
        for part, f, r, e in zip(("loss", "grad_h", "grad_W"), fused, ref, exact):
            row[part] = {"fused": rel(f, e), "reference": rel(r, e)}
            if not row[part]["fused"] <= 2 * row[part]["reference"] + floor:
                failed.append(f"{name} {part}")
        results[name] = row
        torch.cuda.empty_cache()
    print("check fused loss (rel. error vs float64):", json.dumps(results), flush=True)
    if failed:
        raise SystemExit(f"fused linear + cross entropy disagrees with the reference: {failed}")
    return results


def print_tables(tgs: list[dict]) -> None:
    by = {(r["model"], r["seq_len"]): r for r in tgs}
    lens = sorted({r["seq_len"] for r in tgs})
    if lens:
        print("\n| seq len | batch | TransNormer TGS | Llama (SDPA) TGS | ratio |")
        print("|---:|---:|---:|---:|---:|")
    for n in lens:
        tn, ll = by.get(("transnormer", n), {}), by.get(("llama", n), {})
        ratio = f"{tn['tgs'] / ll['tgs']:.2f}x" if tn.get("tgs") and ll.get("tgs") else "-"
        tn_tgs, ll_tgs = tn.get("tgs") or "OOM", ll.get("tgs") or "OOM"
        print(f"| {n} | {tn.get('batch', ll.get('batch'))} | {tn_tgs} | {ll_tgs} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/transnormer/100m_gpu.yaml", help="its `model:` section is used")
    parser.add_argument("--models", default="transnormer,llama", help="TGS models; empty: skip the TGS table")
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--loss", choices=("fused", "checkpointed"), default="fused",
                        help="training-step loss for both models (see the module docstring)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--profile-seq-len", type=int, default=0, help="profile one TransNormer step at this length")
    parser.add_argument("--out", help="write all results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_tgs.py times CUDA training steps; run it on a GPU machine")
    import triton

    model_cfg = load_config(args.config)["model"]
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    if any(args.tokens_per_step % n for n in seq_lens):
        raise SystemExit(f"--tokens-per-step {args.tokens_per_step} must be a multiple of every length {seq_lens}")
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "model": model_cfg, "tokens_per_step": args.tokens_per_step}
    print(json.dumps(env), flush=True)
    env["loss"] = args.loss
    loss_check = None if args.skip_check else check_fused_loss(model_cfg["hidden_size"])
    check = None if args.skip_check else check_cuda_path(model_cfg)
    kinds = [k for k in args.models.split(",") if k]
    tgs = bench_tgs(model_cfg, kinds, seq_lens, args.tokens_per_step, args.loss) if kinds else []
    profile = (profile_step(model_cfg, args.profile_seq_len, args.tokens_per_step, args.loss)
               if args.profile_seq_len else None)
    print_tables(tgs)
    if args.out:
        results = {"env": env, "check": check, "loss_check": loss_check, "tgs": tgs,
                   "profile": profile}
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
