"""Time Loki PCA calibration of a SmolLM2-135M-shaped model over 1M tokens on the GPU (issue 2).

The GPU machine cannot fetch the real weights or `datasets`, so the model has SmolLM2-135M's exact
architecture with random weights (the same FLOPs and bytes as the real one), and the text is given as token
ids (`--tokens file.pt`, e.g. the book corpus tokenized here) or drawn at random. The basis is checked:
orthonormal components, eigenvalues sorted, every token counted.

    PYTHONPATH=. python scripts/bench_calibration.py --num-tokens 1048576 --rotary pre post
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_patch import calibrate_pca

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True)


class IdTexts:
    """Feeds pre-tokenized ids through calibrate_pca's text interface: each 'text' is a chunk of ids."""

    eos_token_id = None

    def __init__(self, ids: torch.Tensor, chunk: int = 4096):
        self.chunks = [ids[i: i + chunk] for i in range(0, len(ids), chunk)]

    def __call__(self, chunk, add_special_tokens=False):
        return {"input_ids": chunk.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-tokens", type=int, default=1 << 20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rotary", nargs="+", default=["pre", "post"])
    parser.add_argument("--tokens", help="a .pt file of int64 token ids (1-D); random ids if omitted")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to("cuda", getattr(torch, args.dtype)).eval()
    ids = torch.load(args.tokens) if args.tokens else torch.randint(0, 49152, (args.num_tokens + args.seq_len,))
    reps = -(-(args.num_tokens + args.seq_len) // len(ids))
    tok = IdTexts(ids.repeat(reps))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | SmolLM2-135M shape, {args.dtype}, "
          f"seq_len {args.seq_len}, batch {args.batch_size}")
    print("| rotary | tokens | seconds | tokens/s | orthonormality error |\n|---|---|---|---|---|")
    for rotary in args.rotary:
        calibrate_pca(model, tok, tok.chunks, num_tokens=args.seq_len * args.batch_size, rotary=rotary,
                      seq_len=args.seq_len, batch_size=args.batch_size, progress=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        basis = calibrate_pca(model, tok, tok.chunks, num_tokens=args.num_tokens, rotary=rotary,
                              seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        p = basis.components.double()
        orth = (p.transpose(-1, -2) @ p - torch.eye(p.shape[-1], dtype=torch.float64)).abs().max().item()
        assert basis.metadata["tokens"] == args.num_tokens // args.seq_len * args.seq_len
        assert (basis.eigenvalues[..., :-1] >= basis.eigenvalues[..., 1:] - 1e-9).all()
        print(f"| {rotary} | {basis.metadata['tokens']} | {seconds:.1f} | {basis.metadata['tokens'] / seconds:,.0f} "
              f"| {orth:.1e} |")


if __name__ == "__main__":
    main()
