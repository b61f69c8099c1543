"""Loki sparse attention for one decode step: Triton kernels on CUDA, a PyTorch implementation elsewhere.

Every path computes the same function. With a query ``q [B, Hq, D]`` rotated into the PCA basis of its KV head
and a cache of rotated keys and values ``[B, Hkv, S, D]`` (GQA: query head ``h`` reads KV head ``h // G``):

1. approximate scores ``a = q[:d_j] . k[:, :d_j]`` over the first ``d_j`` principal dims of KV head ``j``;
2. the ``k_b`` kept keys of sequence ``b`` (``k_b`` given by the caller, or ``k`` for every row) among its valid
   positions ``kv_start[b] <= s < kv_end[b]`` (by default all ``S``; ``n_b = kv_end[b] - kv_start[b]``): the
   first ``sink`` and the last ``recent`` valid positions always (protected, counted inside ``k_b``), then the
   best approximate scores among the other valid keys, per query head (``gqa_select="query"``) or per KV head on
   the max of ``a`` over its G query heads (``"group"``);
3. exact softmax attention (all D dims, ``scaling``) over the kept keys, accumulated in float32.

The kernels apply the budget (``k``, ``k_b``, ``sink``, ``recent``); they do not derive it (`hf_patch.loki.budget`
does). Protected positions take the score +inf in stage 1, so every selection below keeps them first.

Stage 1 reads the first dims of the keys either from the key cache or, when given, from ``k_approx``: a
contiguous copy of the first ``d' >= max d`` rotated dims (``LokiCache`` keeps one; it costs d'/D of the key
memory and lets stage 1 stream whole rows instead of 64-byte pieces of 256-byte rows).

The Triton path runs one of three forms, by the cache length S (thresholds in `LokiKernelConfig`):

- S <= ``fused_max_seq`` (``graph_fused_max_seq`` while a CUDA graph captures): one kernel, one program per
  selection row, runs all three stages;
- otherwise a scores kernel (all G heads of a KV head in one pass over the keys, split over S), the selection,
  and a split-K attention kernel that gathers the kept keys and values by position, keeps an online softmax
  and whose last program per row merges the splits. The selection is one kernel with one program per row for
  rows up to ``select_kernel_max_seq`` when they are enough to fill the GPU (a strided sample brackets the
  k_b-th score, one pass collects the candidates inside the bracket, a radix select finds the threshold, one
  pass writes the positions), else three kernels with many programs per row, one chunk of the row each:
  (1) count the chunk's scores above the bracket and add a 256-bin histogram of those inside it to the row's;
  the row's last program finds the bin of the k_b-th score; (2) count the chunk's scores above that bin and
  collect the bin's few candidates; the row's last program finds the exact threshold among them and each
  chunk's output offset and share of the ties; (3) write each chunk's positions.

Every selection is the exact top-k_b, ties at the threshold to the earliest positions, positions in increasing
order (deterministic: the same positions and the same output, bit for bit, on every call). Protected positions
(+inf) never straddle the threshold while k_b is at least their number: they all lie above it or are all of it.

The stages live in their own modules: `scores` (stage 1), `select` (stage 2), `attention` (stage 3, and the dense
step's kernel), `fused` (the one-kernel form); this module checks the arguments and picks the form. The Triton path
keeps its scratch buffers in a `DecodeWorkspace` that the caller owns and passes (`LokiCache` keeps one; without
it each call allocates its own). The PyTorch path (`naive`) selects with ``torch.topk``.
"""
from __future__ import annotations

import torch

from .attention import triton_attend
from .config import DEFAULT_CONFIG, TRITON_DTYPES, LokiKernelConfig
from .fused import triton_fused
from .naive import loki_decode_attention_torch
from .problem import check_decode
from .scores import triton_scores
from .select import select_tokens
from .workspace import DecodeWorkspace


def loki_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    d: int | tuple[int, ...] | torch.Tensor,
    k: int,
    scaling: float,
    k_b: torch.Tensor | None = None,
    sink: int = 0,
    recent: int = 0,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    gqa_select: str = "group",
    k_approx: torch.Tensor | None = None,
    config: LokiKernelConfig | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Loki decode step with the Triton kernels (bf16/fp16/fp32; CUDA, or CPU under TRITON_INTERPRET=1).
    Same arguments and result as `loki_decode_attention`; `config` overrides the launch settings; `out`
    ([B, Hq, D] in q.dtype, last dim contiguous) receives the result when given."""
    p = check_decode(q, k_cache, v_cache, d, k, k_b, sink, recent, kv_start, kv_end, gqa_select, k_approx)
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton path takes {TRITON_DTYPES}, got {q.dtype}: use loki_decode_attention_torch")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with stride(-1) == 1")
    if k == 0:
        return out.zero_()
    cfg = config or DEFAULT_CONFIG
    ws = workspace or DecodeWorkspace()
    keys = k_cache if k_approx is None else k_approx
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if p.seq <= (cfg.graph_fused_max_seq if capturing else cfg.fused_max_seq):
        return triton_fused(p, q, keys, k_cache, v_cache, kv_start, kv_end, scaling, cfg, out, ws)
    scores = triton_scores(p, q, keys, kv_start, kv_end, cfg, ws)
    idx = select_tokens(scores, k, p.k_b, p.rows_per_batch, cfg, ws)
    return triton_attend(p, q, k_cache, v_cache, idx, scaling, cfg, out, ws)


def loki_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    d: int | tuple[int, ...] | torch.Tensor,
    k: int,
    scaling: float,
    k_b: torch.Tensor | None = None,
    sink: int = 0,
    recent: int = 0,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    gqa_select: str = "group",
    k_approx: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """One Loki decode step: sparse attention of `q` over the k_b kept keys of each sequence.

    q: [B, Hq, D] rotated into the PCA basis of its KV head; k_cache, v_cache: [B, Hkv, S, D] (keys rotated; any
    strides with stride(-1) == 1, e.g. [:, :, :S] of a preallocated cache); d: dims of the approximate scores,
    an int, or one per KV head (tuple of ints or int tensor [Hkv]; a tensor on the GPU costs a host sync);
    scaling: softmax scale.

    The budget (`hf_patch.loki.budget` computes it; the op only applies it):
    k: keys each selection row keeps when k_b is None (every row then sees all S keys: 1 <= k <= S), else the
    bound of k_b (the width of the index buffers: 0 <= k <= S); k_b: int32/int64 [B] on q's device, keys kept by
    sequence b, 0 <= k_b <= min(k, n_b) with n_b = kv_end - kv_start (read on the device: no host sync; required
    with kv_start/kv_end); sink, recent: the first `sink` and the last `recent` valid positions of each sequence
    are always kept, whatever their scores, and count inside k_b (k_b >= min(n_b, sink + recent) is the caller's
    to keep); the other kept keys are the best approximate scores among the remaining valid ones.

    kv_start: int [B] first valid key of each sequence (left padding) or None; kv_end: int [B] one past the last
    valid key of each sequence, or None (= S): with both, a fixed-size cache with a length on the device (CUDA
    graphs), and no host sync (0 <= kv_start <= kv_end <= S is the caller's to keep); gqa_select: "group" (one
    top-k per KV head on the max over its query heads) or "query" (one per query head);
    k_approx: optional [B, Hkv, S, d'] copy of the first d' >= max d dims of the rotated keys (stride(-1) == 1;
    `LokiCache` keeps one, costing d'/D of the key memory): the approximate scores read it instead of k_cache,
    whole rows at full bandwidth; the result is the same.
    workspace: the Triton path's scratch buffers, kept by the caller between calls (`LokiCache` and the graph
    runner keep one; a CUDA graph that captured a call replays into its buffers); None: this call allocates its
    own. Calls that share a workspace on one stream must not overlap in time.
    Returns [B, Hq, D] in q.dtype (0 for a sequence that keeps no key). CUDA bf16/fp16/fp32 runs the Triton
    kernels, anything else PyTorch.
    """
    args = dict(d=d, k=k, scaling=scaling, k_b=k_b, sink=sink, recent=recent, kv_start=kv_start, kv_end=kv_end,
                gqa_select=gqa_select, k_approx=k_approx)
    if q.is_cuda and q.dtype in TRITON_DTYPES:
        return loki_decode_attention_triton(q, k_cache, v_cache, workspace=workspace, **args)
    return loki_decode_attention_torch(q, k_cache, v_cache, **args)
