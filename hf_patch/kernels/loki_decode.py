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

The Triton path keeps scratch buffers per (device, stream) between calls (`clear_workspaces` frees them), so
calls on one stream must not overlap in time (stream order guarantees this for ordinary use). The PyTorch
path selects with ``torch.topk``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import dot_block, dot_options, num_sms

GQA_SELECT = ("query", "group")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
_SUB_BINS = 256  # bins of the bracket histogram of the multi-program selection
# Per-row int32 header of the multi-program selection: threshold, candidate count, tickets of passes 1 and 2,
# the threshold bin's first and last key, the rank of the k_b-th score within that bin, resolved (by pass 1).
# Then per chunk: count above (the bracket, then the bin), output offset, share of the ties.
_META = tl.constexpr(8)
# Kernels take the integers that change with the cache length (S, k, tile and split counts) unspecialised
# (`do_not_specialize`): Triton would otherwise compile a new variant whenever one of them changes its divisibility
# by 16, i.e. again and again during generation (0.2-0.9 s each on the H100 machine).


@dataclass(frozen=True)
class LokiKernelConfig:
    """Launch settings of the Triton path (block sizes in tokens; splits aim at `programs_per_sm` per SM)."""

    block_n_scores: int = 64
    block_n_attn: int = 32
    # warps of a split-attention program (H100 GPU time, (0.25, 0.25): 1 warp 57.9 / 35.8 / 190.4 / 99.3 us at
    # (B, S) = (1, 128k) / (1, 64k) / (8, 64k) / (16, 16k), 2 warps 63.3 / 41.1 / 192.1 / 99.0, 4 warps 70.7 /
    # 46.6 / 199.6 / 99.5: each program's tiles are tiny)
    attn_warps: int = 1
    programs_per_sm: int = 4
    num_warps: int = 4
    num_stages: int = 3
    select_block: int = 2048  # scores per tile of the selection kernels
    select_sample: int = 2048  # strided sample that brackets the k-th score (one program per row)
    select_warps: int = 8
    # Rows up to this length select with one program per row if there are at least `select_kernel_min_rows_per_sm`
    # rows per SM; longer rows, or fewer, with several programs per row. H100 selection GPU time (8 KV heads,
    # 2026-11-25): one program per row 39 / 38 / 38 / 69 / 28 us at (B, S) = (16, 16k) / (8, 16k) / (1, 16k) /
    # (8, 32k) / (16, 8k), several 56 / 40 / 21 / 55 / 41 us; past 32k several programs win at every B.
    select_kernel_max_seq: int = 32768
    select_kernel_min_rows_per_sm: float = 0.5
    multi_select_block: int = 1024  # scores per tile of the multi-program selection
    # Its bracket sample, which every program sorts: 256 keys make a wider bracket (more candidates for pass 2)
    # than 1024 but cost each program less; H100 GPU time of the whole step, (0.25, 0.25): 129.4 / 379.1 / 723.7 /
    # 711.0 us at (B, S) = (1, 128k) / (8, 64k) / (8, 128k) / (16, 64k) against 134.0 / 385.0 / 727.9 / 718.4
    # with 1024, and lower at every shape tried (1k-128k, B = 1 / 8 / 16).
    multi_select_sample: int = 256
    multi_select_max_chunks: int = 256  # programs per row at most
    multi_select_warps: int = 4
    # Caches up to this length run the whole step in one kernel, one program per selection row: fewer launches,
    # which pays where the host launches them one by one. Inside a CUDA graph launches cost no host time and the
    # three-stage form wins at every size measured (H100 GPU time, (0.25, 0.25), B = 1 / 8 / 16: fused 36.6 /
    # 37.5 / 41.3 us at S = 1k, 66.8 / 80.3 / 88.0 at 4k; three stages 32.6 / 37.4 / 40.3 and 37.2 / 57.6 / 74.7),
    # so captures use `graph_fused_max_seq`.
    fused_max_seq: int = 4096
    graph_fused_max_seq: int = 0
    block_n_fused: int = 128  # keys per tile of the fused kernel's scores stage
    block_n_fused_attn: int = 64  # kept keys per tile of the fused kernel's attention stage
    fused_warps: int = 4


_DEFAULT_CONFIG = LokiKernelConfig()


@dataclass(frozen=True)
class _Problem:
    """Validated arguments: sizes, the per-head dims and the budget."""

    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    d_max: int
    dims: torch.Tensor | None  # int [Hkv] when heads use different d, else None (all use d_max)
    group: bool
    k: int  # keys kept per row (k_b None), else the bound of k_b
    k_b: torch.Tensor | None  # int32 [B] keys kept per sequence, on q's device
    sink: int
    recent: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def rows_per_batch(self) -> int:
        """Selection rows per sequence: one per KV head ("group") or per query head ("query")."""
        return self.kv_heads if self.group else self.q_heads

    @property
    def protect(self) -> bool:
        """Whether some positions are kept whatever their scores (sink or recent)."""
        return self.sink > 0 or self.recent > 0


def _check_int_tensor(name: str, x: torch.Tensor | None, b: int, device: torch.device) -> None:
    """kv_start / kv_end / k_b must be int32/int64 tensors [B] on q's device (their values stay on the device)."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.shape != (b,) or x.dtype not in (torch.int32, torch.int64):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an int32/int64 tensor [B={b}], got {got}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, q on {device}: move it to q's device")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_tensors(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Shapes, dtypes, devices and strides of q [B, Hq, D], k_cache and v_cache [B, Hkv, S, D]."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [B, Hkv, S, D]; got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    b, hq, dh = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[0] != b or k_cache.shape[-1] != dh:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k_cache and v_cache must share one dtype of {_DTYPES}; got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError("q, k_cache and v_cache must be on one device")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim (stride(-1) == 1)")


def _check_dims(d, hkv: int, dh: int) -> tuple[int, int, tuple[int, ...] | None]:
    """(min d, max d, per-head dims or None) of an int or ints per KV head (tuple or int tensor [Hkv])."""
    if isinstance(d, torch.Tensor):
        if d.shape != (hkv,) or d.dtype.is_floating_point or d.dtype == torch.bool:
            raise ValueError(f"per-head d must be an int tensor [Hkv={hkv}], got {d.dtype} {tuple(d.shape)}")
        d = tuple(d.tolist())  # a host sync when d is on the GPU: keep it on the CPU or pass a tuple of ints
    if isinstance(d, (tuple, list)):
        if len(d) != hkv or not all(_is_int(x) for x in d):
            raise ValueError(f"per-head d must hold {hkv} ints (one per KV head), got {d!r}")
        d_min, d_max = min(d), max(d)
    elif _is_int(d):
        d_min = d_max = d
    else:
        raise TypeError(f"d must be an int, or ints per KV head (tuple or int tensor [Hkv]), got {type(d).__name__}")
    if not 1 <= d_min <= d_max <= dh:
        raise ValueError(f"d must lie in [1, D={dh}], got values in [{d_min}, {d_max}]")
    return d_min, d_max, tuple(d) if d_min != d_max else None


def _check_budget(k, k_b, sink, recent, seq: int, bounded: bool) -> None:
    """k, k_b, sink and recent (see `loki_decode_attention`); the values of k_b are the caller's to keep."""
    if not _is_int(k):
        raise TypeError(f"k must be an int (keys kept per row, or the bound of k_b), got {type(k).__name__}")
    for name, value in (("sink", sink), ("recent", recent)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (positions always kept), got {value!r}")
    if k_b is not None:
        if not 0 <= k <= seq:
            raise ValueError(f"k (the bound of k_b) must lie in [0, S={seq}], got {k}")
        return
    if bounded:
        raise ValueError("with kv_start/kv_end, pass k_b (int tensor [B]: keys kept per sequence, at most "
                         "min(k, kv_end - kv_start)); k alone means every row sees all S keys")
    if not 1 <= k <= seq:
        raise ValueError(f"k must lie in [1, S={seq}] when k_b is None (every row keeps k of its S keys), got {k}")
    if k < min(seq, sink + recent):
        raise ValueError(f"k ({k}) must be at least min(S, sink + recent) = {min(seq, sink + recent)}: the protected "
                         "positions count inside k")


def _check(q, k_cache, v_cache, d, k, k_b, sink, recent, kv_start, kv_end, gqa_select, k_approx) -> _Problem:
    """Validate the arguments of `loki_decode_attention`; raise ValueError/TypeError saying what to fix."""
    _check_tensors(q, k_cache, v_cache)
    b, hq, dh = q.shape
    _, hkv, s, _ = k_cache.shape
    if gqa_select not in GQA_SELECT:
        raise ValueError(f"gqa_select must be one of {GQA_SELECT}, got {gqa_select!r}")
    for name, x in (("kv_start", kv_start), ("kv_end", kv_end), ("k_b", k_b)):
        _check_int_tensor(name, x, b, q.device)
    _check_budget(k, k_b, sink, recent, s, kv_start is not None or kv_end is not None)
    _, d_max, per_head = _check_dims(d, hkv, dh)
    if k_approx is not None and (k_approx.dim() != 4 or k_approx.shape[:3] != k_cache.shape[:3]
                                 or not d_max <= k_approx.shape[-1] <= dh or k_approx.dtype != q.dtype
                                 or k_approx.device != q.device or k_approx.stride(-1) != 1):
        raise ValueError(f"k_approx must be [B, Hkv, S, d'] with max d = {d_max} <= d' <= D, k_cache's "
                         f"{tuple(k_cache.shape[:3])}, dtype {q.dtype}, device {q.device} and stride(-1) == 1; "
                         f"got {k_approx.dtype} {tuple(k_approx.shape)} on {k_approx.device}")
    dims = _dims_on(q.device, per_head) if per_head is not None else None
    k_b = k_b.to(torch.int32) if k_b is not None else None  # on the device: no host sync
    return _Problem(b, hq, hkv, s, dh, d_max, dims, gqa_select == "group", k, k_b, sink, recent)


@functools.lru_cache(maxsize=64)
def _dims_on(device: torch.device, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-head dims as int32 [Hkv] on `device`, copied once (no host-to-device copy per decode step)."""
    return torch.tensor(dims, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch implementation
# ---------------------------------------------------------------------------------------------------------------


def _torch_scores(p: _Problem, qg: torch.Tensor, keys: torch.Tensor, kv_start: torch.Tensor | None,
                  kv_end: torch.Tensor | None) -> torch.Tensor:
    """Approximate scores [B, Hkv, G or 1, S] of qg [B, Hkv, G, D] against the first dims of keys [B, Hkv, S, d'];
    -inf outside [kv_start, kv_end), +inf at the protected positions (kept first by any top-k)."""
    q_approx = qg[..., : p.d_max]
    if p.dims is not None:
        keep = torch.arange(p.d_max, device=qg.device) < p.dims[:, None]  # [Hkv, d_max]
        q_approx = q_approx * keep[None, :, None]
    scores = torch.matmul(q_approx, keys[..., : p.d_max].to(qg.dtype).transpose(-1, -2))  # [B, Hkv, G, S]
    if p.group:
        scores = scores.amax(dim=2, keepdim=True)  # [B, Hkv, 1, S]
    pos = torch.arange(p.seq, device=qg.device)[None, :]  # [1, S]
    lo = 0 if kv_start is None else kv_start[:, None].long()  # [B, 1]
    hi = p.seq if kv_end is None else kv_end[:, None].long()
    valid = (pos >= lo) & (pos < hi)  # [B or 1, S]
    if p.protect:
        protected = valid & ((pos < lo + p.sink) | (pos >= hi - p.recent))
        scores = scores.masked_fill(protected[:, None, None], float("inf"))
    return scores.masked_fill(~valid[:, None, None], float("-inf"))


def loki_decode_attention_torch(
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
) -> torch.Tensor:
    """Loki decode step in PyTorch (any device; also float64). Same arguments and result as
    `loki_decode_attention`. Reads the first d dims of the keys (from `k_approx` when given) and gathers only
    the kept rows of K and V."""
    p = _check(q, k_cache, v_cache, d, k, k_b, sink, recent, kv_start, kv_end, gqa_select, k_approx)
    b, hkv, g, s, k_b = p.batch, p.kv_heads, p.group_size, p.seq, p.k_b
    if k == 0:
        return q.new_zeros(q.shape)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, hkv, g, p.head_dim).to(acc_dtype)  # [B, Hkv, G, D]
    scores = _torch_scores(p, qg, k_cache if k_approx is None else k_approx, kv_start, kv_end)
    idx = scores.topk(k, dim=-1, sorted=k_b is not None).indices  # [B, Hkv, G or 1, k]

    rows = idx.shape[2]
    gather = idx[..., None].expand(b, hkv, rows, k, p.head_dim)
    k_sel = k_cache[:, :, None].expand(b, hkv, rows, s, p.head_dim).gather(3, gather).to(acc_dtype)
    v_sel = v_cache[:, :, None].expand(b, hkv, rows, s, p.head_dim).gather(3, gather).to(acc_dtype)
    dead = None if k_b is None else torch.arange(k, device=q.device)[None, :] >= k_b[:, None]  # [B, k] unused slots
    if dead is not None:  # they may hold any key, e.g. unwritten memory past kv_end: 0 * NaN would be NaN
        v_sel = v_sel.masked_fill(dead[:, None, None, :, None], 0.0)
    if rows == g:  # query selection: each head has its own rows  [B, Hkv, G, k, D]
        logits = torch.matmul(qg[..., None, :], k_sel.transpose(-1, -2)).squeeze(-2)  # [B, Hkv, G, k]
    else:  # group selection: shared rows [B, Hkv, 1, k, D]
        logits = torch.matmul(qg, k_sel[:, :, 0].transpose(-1, -2))  # [B, Hkv, G, k]
    logits = logits * scaling
    if dead is not None:
        logits = logits.masked_fill(dead[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    if rows == g:
        out = torch.matmul(probs[..., None, :], v_sel).squeeze(-2)
    else:
        out = torch.matmul(probs, v_sel[:, :, 0])
    return out.reshape(b, p.q_heads, p.head_dim).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton building blocks
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _order_key(score):
    """float32 -> int32 whose signed order is the order of the floats (NaN aside; -0.0 and +0.0 map to one key,
    as they compare equal)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_heads(q_ptr, b, head0, n_heads, stride_qb, stride_qh, offs_g, offs_d, n_dims, UPCAST: tl.constexpr):
    """Rows head0 .. head0 + n_heads - 1 of q[b] as [BLOCK_G, BLOCK_D], zero past n_heads heads and n_dims dims."""
    q = tl.load(q_ptr + b * stride_qb + (head0 + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < n_heads)[:, None] & (offs_d < n_dims)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _key_dims(offs_d, d, KEY_WIDTH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dims of a key row that the approximate scores read: whole 8-element (16-byte) groups covering d, so the
    loads stay vectorized (a mask against a runtime d would split them into scalar loads; the extra dims meet
    zeros of q), within the KEY_WIDTH dims that the key buffer holds."""
    ok = (offs_d // 8) < tl.cdiv(d, 8)
    if KEY_WIDTH < BLOCK_D:
        ok = ok & (offs_d < KEY_WIDTH)
    return ok


@triton.jit
def _approx_tile(q, k_base, stride_ks, offs_n, offs_d, kd_ok, end, start, sink, recent,
                 PROTECT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Approximate scores [BLOCK_G, BLOCK_N] of q's rows against the keys at offs_n; -inf outside [start, end)
    (keys at or past end are not read); PROTECT: +inf at the protected positions, [start, start + sink) and
    [end - recent, end) within [start, end)."""
    before_end = offs_n < end
    keys = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=before_end[:, None] & kd_ok[None, :],
                   other=0.0)
    if UPCAST:
        keys = keys.to(tl.float32)
    a = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC)
    if PROTECT:
        a = tl.where(((offs_n < start + sink) | (offs_n >= end - recent))[None, :], float("inf"), a)
    return tl.where((before_end & (offs_n >= start))[None, :], a, float("-inf"))


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, vals, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of an online softmax in base 2 (flash attention): logits s [M, N] already scaled by log2(e)
    (-inf = key dropped), values [N, D] -> updated (acc [M, D], running max [M], running sum [M]), float32.
    A row with nothing kept so far keeps max -inf, sum 0 and acc 0."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(vals.dtype)
    if UPCAST:
        p, vals = p.to(tl.float32), vals.to(tl.float32)
    return acc * alpha[:, None] + tl.dot(p, vals, input_precision=DOT_PREC), m_new, l_i


@triton.jit
def _attend(q, k_base, v_base, i_row, n_lo, n_hi, stride_ks, stride_vs, qk_scale, offs_d, d_ok, m_i, l_i, acc,
            BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DENSE: tl.constexpr = False,
            pos0=0):
    """Online softmax (base 2) of q's rows over the keys and values at positions i_row[n_lo:n_hi] (DENSE: at
    positions pos0 + n_lo .. pos0 + n_hi - 1, no index read), continuing from (m_i, l_i, acc); returns the updated
    (max, sum, acc) in float32."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        live = offs_n < n_hi
        if DENSE:
            idx = pos0 + offs_n
        else:
            idx = tl.load(i_row + offs_n, mask=live, other=0)
        tile_mask = live[:, None] & d_ok[None, :]
        keys = tl.load(k_base + idx[:, None] * stride_ks + offs_d[None, :], mask=tile_mask, other=0.0)
        if UPCAST:
            keys = keys.to(tl.float32)
        s = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC) * qk_scale
        s = tl.where(live[None, :], s, float("-inf"))
        vals = tl.load(v_base + idx[:, None] * stride_vs + offs_d[None, :], mask=tile_mask, other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, vals, DOT_PREC, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _store_heads(out_ptr, b, head0, n_heads, stride_ob, stride_oh, offs_g, offs_d, d_ok, l_i, acc):
    """out[b, head0 + g] = acc[g] / l_i[g] for the row's heads (0 where nothing was kept)."""
    res = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + (head0 + offs_g)[:, None] * stride_oh + offs_d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=(offs_g < n_heads)[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits(part, out_ptr, b, head0, heads, n_split, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, head0 + g] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits' partials of one row
    (m at part[s * heads + g], l after them, acc [D] after those); 0 where nothing was kept."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_part = n_split * heads
    for g in range(heads):
        m_max = tl.full([], float("-inf"), tl.float32)
        for s0 in range(0, n_split, BLOCK_S):
            m = tl.load(part + (s0 + offs_s) * heads + g, mask=s0 + offs_s < n_split, other=float("-inf"),
                        cache_modifier=".cg")
            m_max = tl.maximum(m_max, tl.max(m, axis=0))
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        denom = tl.zeros([], tl.float32)
        num = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n_split, BLOCK_S):
            ok = s0 + offs_s < n_split
            slot = (s0 + offs_s) * heads + g
            w = tl.exp2(tl.load(part + slot, mask=ok, other=float("-inf"), cache_modifier=".cg") - m_ref)
            denom += tl.sum(w * tl.load(part + n_part + slot, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
            acc = tl.load(part + 2 * n_part + slot[:, None] * HEAD_DIM + offs_d[None, :],
                          mask=ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            num += tl.sum(w[:, None] * acc, axis=0)
        res = tl.where(denom > 0, num / tl.where(denom > 0, denom, 1.0), 0.0)
        tl.store(out_ptr + b * stride_ob + (head0 + g) * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty),
                 mask=d_ok)


# --- exact top-k selection -------------------------------------------------------------------------------------


@triton.jit
def _digit_hist(u, ok, prefix, shift):
    """[256] histogram of the 8-bit digit at `shift` of the unsigned keys `u` (int64) that are `ok` and agree with
    `prefix` on the digits above it."""
    match = ok & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
    digit = tl.where(match, (u >> shift) & 255, 0).to(tl.int32)
    return tl.histogram(digit, 256) - tl.where(tl.arange(0, 256) == 0, tl.sum(tl.where(match, 0, 1)), 0)


@triton.jit
def _pick_digit(hist, need, prefix, shift):
    """The digit of the need-th largest key given the [256] histogram of its candidates' digits:
    (prefix with it, its rank among the keys with that digit, how many keys have that digit)."""
    bins = tl.arange(0, 256)
    chosen = tl.max(tl.where(tl.cumsum(hist, 0, reverse=True) >= need, bins, -1))
    need -= tl.sum(tl.where(bins > chosen, hist, 0))
    return prefix + (chosen.to(tl.int64) << shift), need, tl.sum(tl.where(bins == chosen, hist, 0))


@triton.jit
def _bracket(s_row, seq, kb, sample_stride, n_sample, SAMPLE: tl.constexpr, MARGIN_SIGMAS: tl.constexpr):
    """Order keys (lo, hi) that hold the kb-th largest score of the row between them with high probability:
    order statistics of a strided sample, MARGIN_SIGMAS binomial standard deviations (+2) either side, to the
    top 16 bits of the key (sign, exponent, 7 mantissa bits) and widened to the edges of those 16-bit bins."""
    offs_m = tl.arange(0, SAMPLE)
    u = _order_key(tl.load(s_row + offs_m * sample_stride, mask=offs_m < n_sample, other=float("-inf")))
    u = u.to(tl.int64) + 2147483648
    frac = kb.to(tl.float32) / seq
    center = frac * n_sample - 1.0  # rank - 1 of the kb-th largest score in the sample, in expectation
    margin = MARGIN_SIGMAS * tl.sqrt(n_sample * frac * (1.0 - frac)) + 2.0
    hi_at = tl.floor(center - margin).to(tl.int32)
    lo_at = tl.ceil(center + margin).to(tl.int32)
    top = _digit_hist(u, u >= 0, tl.zeros([], dtype=tl.int64), 24)  # the first digit: shared by both
    hi_p, hi_r, _ = _pick_digit(top, tl.maximum(hi_at, 0) + 1, tl.zeros([], dtype=tl.int64), 24)
    lo_p, lo_r, _ = _pick_digit(top, tl.minimum(lo_at, n_sample - 1) + 1, tl.zeros([], dtype=tl.int64), 24)
    hi_p, _, _ = _pick_digit(_digit_hist(u, u >= 0, hi_p, 16), hi_r, hi_p, 16)
    lo_p, _, _ = _pick_digit(_digit_hist(u, u >= 0, lo_p, 16), lo_r, lo_p, 16)
    hi = tl.where(hi_at >= 0, hi_p + 65535 - 2147483648, 2147483647)
    lo = tl.where(lo_at < n_sample, lo_p - 2147483648, -2147483648)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _radix_select(c_row, n, need, lo, hi, BLOCK: tl.constexpr):
    """The need-th largest (1 = largest) of the n order keys at c_row, all within [lo, hi], by 8-bit radix
    passes over them (the leading digits that lo and hi share are skipped).

    Returns (t, rank, n_equal): the key t, the rank of the need-th key among the keys equal to t, and how many
    keys equal t."""
    diff = lo ^ hi
    first = (diff >> 24 == 0).to(tl.int32) + (diff >> 16 == 0).to(tl.int32) + (diff >> 8 == 0).to(tl.int32) + \
        (diff == 0).to(tl.int32)
    prefix = (lo.to(tl.int64) + 2147483648) >> (32 - 8 * first) << (32 - 8 * first)  # the shared digits
    n_equal = n + tl.zeros([], dtype=tl.int32)
    for p in range(first, 4):
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n
            u = tl.load(c_row + offs, mask=ok, other=0, cache_modifier=".cg").to(tl.int64) + 2147483648
            hist += _digit_hist(u, ok, prefix, 24 - 8 * p)
        prefix, need, n_equal = _pick_digit(hist, need, prefix, 24 - 8 * p)  # last digit: n_equal keys equal t
    return (prefix - 2147483648).to(tl.int32), need, n_equal


@triton.jit
def _padded_len(n):
    """n rounded up to 16, known to the compiler as a multiple of 16 (masks against it vectorize)."""
    return tl.multiple_of((n + 15) // 16 * 16, 16)


@triton.jit
def _load_scores(s_row, offs, n, PADDED: tl.constexpr):
    """Scores at `offs`, -inf at positions >= n. PADDED: the row is readable up to n rounded up to 16 (workspace
    rows are), so the load takes a 16-aligned mask and vectorizes (a mask against n itself, unknown in
    alignment since lengths are not specialised on, splits it into scalar loads)."""
    if PADDED:
        ok = offs < n
        return tl.where(ok, tl.load(s_row + offs, mask=offs < _padded_len(n), other=float("-inf")), float("-inf"))
    return tl.load(s_row + offs, mask=offs < n, other=float("-inf"))


@triton.jit
def _write_positions(s_row, i_row, pos_lo, pos_hi, t, need, out_at, BREAK_TIES: tl.constexpr, BLOCK: tl.constexpr,
                     PADDED: tl.constexpr):
    """Write to i_row[out_at:], in increasing order, the positions in [pos_lo, pos_hi) with key > t and the first
    `need` of those with key == t (all of them without BREAK_TIES)."""
    n_out = out_at + tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    for start in range(pos_lo, pos_hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < pos_hi
        key = _order_key(_load_scores(s_row, offs, pos_hi, PADDED))
        if BREAK_TIES:
            eq = ok & (key == t)
            take = (ok & (key > t)) | (eq & (n_eq + tl.cumsum(eq.to(tl.int32), 0) <= need))
            n_eq += tl.sum(eq.to(tl.int32))
        else:
            take = ok & (key >= t)
        tl.store(i_row + n_out + tl.cumsum(take.to(tl.int32), 0) - 1, offs, mask=take)
        n_out += tl.sum(take.to(tl.int32))


@triton.jit
def _classify_tile(s_row, offs, seq, lo, hi, PADDED: tl.constexpr):
    """Order keys of the scores at `offs` (positions past seq masked), how many lie above `hi`, and the mask of
    those within [lo, hi]."""
    ok = offs < seq
    key = _order_key(_load_scores(s_row, offs, seq, PADDED))
    return key, tl.sum((ok & (key > hi)).to(tl.int32)), ok & (key >= lo) & (key <= hi)


@triton.jit
def _all_keys_as_candidates(s_row, ck_row, cp_row, seq, BLOCK: tl.constexpr, WITH_POS: tl.constexpr,
                            PADDED: tl.constexpr):
    """The fallback when the sample misled: every score of the row becomes a candidate, its order key at ck_row
    (and, WITH_POS, its position at cp_row)."""
    for start in range(0, seq, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < seq
        tl.store(ck_row + offs, _order_key(_load_scores(s_row, offs, seq, PADDED)), mask=ok)
        if WITH_POS:
            tl.store(cp_row + offs, offs, mask=ok)


@triton.jit
def _select_row(s_row, c_row, i_row, seq, kb, sample_stride, n_sample,
                SAMPLE: tl.constexpr, BLOCK: tl.constexpr, MARGIN_SIGMAS: tl.constexpr, PADDED: tl.constexpr):
    """Exact top-kb (kb >= 1) of one row of scores [seq] -> its positions in increasing order at i_row.

    A strided sample brackets the kb-th largest score: one pass counts the scores above the bracket
    and copies the keys inside it to `c_row`; if the bracket misses (unlucky sample), every key becomes a
    candidate. A radix select over the candidates gives the exact threshold key t; the last pass writes the
    positions with key > t and, of those with key == t, the first ones, up to kb in all.
    """
    lo, hi = _bracket(s_row, seq, kb, sample_stride, n_sample, SAMPLE, MARGIN_SIGMAS)
    n_hi = tl.zeros([], dtype=tl.int32)
    n_mid = tl.zeros([], dtype=tl.int32)
    for start in range(0, seq, BLOCK):
        key, above, mid = _classify_tile(s_row, start + tl.arange(0, BLOCK), seq, lo, hi, PADDED)
        tl.store(c_row + n_mid + tl.cumsum(mid.to(tl.int32), 0) - 1, key, mask=mid)
        n_mid += tl.sum(mid.to(tl.int32))
        n_hi += above
    tl.debug_barrier()
    if (n_hi >= kb) | (n_hi + n_mid < kb):  # the sample misled: all keys are candidates
        _all_keys_as_candidates(s_row, c_row, c_row, seq, BLOCK, WITH_POS=False, PADDED=PADDED)
        n_hi = n_hi * 0
        n_mid = n_mid * 0 + seq
        lo = lo * 0 + (-2147483648)
        hi = hi * 0 + 2147483647
    tl.debug_barrier()
    t, need, n_equal = _radix_select(c_row, n_mid, kb - n_hi, lo, hi, BLOCK)
    if n_equal == need:  # no tie to break (the usual case): every key >= t
        _write_positions(s_row, i_row, 0, seq, t, need, 0, BREAK_TIES=False, BLOCK=BLOCK, PADDED=PADDED)
    else:
        _write_positions(s_row, i_row, 0, seq, t, need, 0, BREAK_TIES=True, BLOCK=BLOCK, PADDED=PADDED)


@triton.jit
def _bin_shift(lo, hi):
    """log2 of the width (in keys) of the bracket's bins: [lo, hi] in at most 256 bins of 2^shift keys (the last
    bin takes any remainder)."""
    span = hi.to(tl.int64) - lo.to(tl.int64) + 1
    return tl.maximum(tl.ceil(tl.log2(span.to(tl.float32))).to(tl.int64) - 8, 0)


@triton.jit
def _count_by_chunk(pos, chunk_len, mask, CP2: tl.constexpr):
    """[CP2] how many of the masked positions fall into each chunk of chunk_len positions."""
    chunk = tl.where(mask, pos // chunk_len, 0)
    misses = tl.sum(tl.where(mask, 0, 1))
    return tl.histogram(chunk, CP2) - tl.where(tl.arange(0, CP2) == 0, misses, 0)


@triton.jit
def _resolve_row(ck_row, cp_row, m_row, n_cand, need, gt_c, lo, hi, chunk_len, n_chunks,
                 CP2: tl.constexpr, BLOCK: tl.constexpr):
    """The exact threshold among a row's n_cand candidates (order keys at ck_row in [lo, hi], positions at
    cp_row; `need` = the rank of the k_b-th score among them, gt_c [CP2] = each chunk's count of keys above them)
    and each chunk's output offset and share of the ties (earliest chunks first), written to the row's meta."""
    chunks = tl.arange(0, CP2)
    t, need, n_equal = _radix_select(ck_row, n_cand, need, lo, hi, BLOCK)
    eq_c = tl.zeros([CP2], dtype=tl.int32)
    for start in range(0, n_cand, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n_cand
        key = tl.load(ck_row + offs, mask=ok, other=0, cache_modifier=".cg")
        pos = tl.load(cp_row + offs, mask=ok, other=0, cache_modifier=".cg")
        gt_c += _count_by_chunk(pos, chunk_len, ok & (key > t), CP2)
        eq_c += _count_by_chunk(pos, chunk_len, ok & (key == t), CP2)
    ties = tl.minimum(tl.maximum(need - (tl.cumsum(eq_c, 0) - eq_c), 0), eq_c)
    take = gt_c + ties
    c_ok = chunks < n_chunks
    tl.store(m_row, t)
    tl.store(m_row + _META + CP2 + chunks, tl.cumsum(take, 0) - take, mask=c_ok)
    tl.store(m_row + _META + 2 * CP2 + chunks, ties, mask=c_ok)


@triton.jit
def _pick_bin(s_row, ck_row, cp_row, m_row, h_row, seq, kb, lo, hi, n_chunks, chunk_len,
              CP2: tl.constexpr, BLOCK: tl.constexpr, PADDED: tl.constexpr):
    """Run by the last program of a row in pass 1, once every chunk has counted: the bracket bin of the kb-th
    largest score (its first and last key and the rank within it) into the row's meta. If the sample misled
    (the kb-th score lies outside the bracket), every key of the row becomes a candidate and the row is
    resolved here (marked so that pass 2 skips it). Resets the row's histogram and ticket."""
    chunks = tl.arange(0, CP2)
    bins = tl.arange(0, 256)
    gt_c = tl.load(m_row + _META + chunks, mask=chunks < n_chunks, other=0, cache_modifier=".cg")
    hist = tl.load(h_row + bins, cache_modifier=".cg")
    need = kb - tl.sum(gt_c)
    if (need <= 0) | (need > tl.sum(hist)):
        _all_keys_as_candidates(s_row, ck_row, cp_row, seq, BLOCK, WITH_POS=True, PADDED=PADDED)
        tl.debug_barrier()
        _resolve_row(ck_row, cp_row, m_row, seq, kb, gt_c * 0, lo * 0 + (-2147483648), hi * 0 + 2147483647,
                     chunk_len, n_chunks, CP2, BLOCK)
        tl.store(m_row + 7, 1)
    else:
        bstar = tl.max(tl.where(tl.cumsum(hist, 0, reverse=True) >= need, bins, -1))
        need -= tl.sum(tl.where(bins > bstar, hist, 0))
        shift = _bin_shift(lo, hi)
        bin_lo = lo.to(tl.int64) + (bstar.to(tl.int64) << shift)
        # the bins cover [lo, hi] only: the last one in use may run past hi (whose keys pass 1 counted above)
        bin_hi = tl.where(bstar == 255, hi.to(tl.int64), tl.minimum(bin_lo + (1 << shift) - 1, hi.to(tl.int64)))
        tl.store(m_row + 4, bin_lo.to(tl.int32))
        tl.store(m_row + 5, bin_hi.to(tl.int32))
        tl.store(m_row + 6, need)
        tl.store(m_row + 7, 0)
    tl.store(m_row + 2, 0)
    tl.store(h_row + bins, tl.zeros([256], dtype=tl.int32))


# --- kernels ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seq", "tiles_per_prog", "sink", "recent"])
def _approx_scores_kernel(
    q_ptr, k_ptr, dims_ptr, start_ptr, end_ptr, s_ptr,
    seq, s_stride, kv_heads, group_size, tiles_per_prog, d_uniform, sink, recent,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
    GROUP: tl.constexpr, PER_HEAD_D: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    PROTECT: tl.constexpr, KEY_WIDTH: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Scores of the G query heads of one KV head over one split of S, on the first d dims only.

    Writes float32 rows (stride s_stride) [B*Hkv, S] (max over the group) or [B*Hq, S] (per query head);
    -inf before kv_start and from kv_end (default S) up to S rounded up to 16 (the rows must hold that many);
    PROTECT: +inf at the protected positions (`_approx_tile`).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)
    j = (row % kv_heads).to(tl.int64)
    d = tl.load(dims_ptr + j) if PER_HEAD_D else d_uniform
    start = tl.load(start_ptr + b) if HAS_START else 0
    end = tl.load(end_ptr + b) if HAS_END else seq
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < group_size
    q = _load_heads(q_ptr, b, j * group_size, group_size, stride_qb, stride_qh, offs_g, offs_d, d, UPCAST)
    kd_ok = _key_dims(offs_d, d, KEY_WIDTH, BLOCK_D)
    k_base = k_ptr + b * stride_kb + j * stride_kh
    for t in range(tiles_per_prog):
        offs_n = (split * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        a = _approx_tile(q, k_base, stride_ks, offs_n, offs_d, kd_ok, end, start, sink, recent, PROTECT, DOT_PREC,
                         UPCAST)
        if GROUP:
            a = tl.max(tl.where(g_ok[:, None], a, float("-inf")), axis=0)
            tl.store(s_ptr + row.to(tl.int64) * s_stride + offs_n, a, mask=offs_n < _padded_len(seq))
        else:
            out = s_ptr + (row.to(tl.int64) * group_size + offs_g)[:, None] * s_stride + offs_n[None, :]
            tl.store(out, a, mask=g_ok[:, None] & (offs_n < _padded_len(seq))[None, :])


@triton.jit(do_not_specialize=["seq", "k_sel", "sample_stride", "n_sample"])
def _select_kernel(
    s_ptr, kb_ptr, cand_ptr, idx_ptr,
    seq, s_stride, c_stride, i_stride, k_sel, rows_per_batch, sample_stride, n_sample,
    HAS_KB: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, MARGIN_SIGMAS: tl.constexpr,
    PADDED: tl.constexpr,
):
    """Exact top-k_b of one row of scores per program (`_select_row`): its positions in increasing order."""
    row = tl.program_id(0).to(tl.int64)
    kb = (tl.load(kb_ptr + row // rows_per_batch) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    if kb > 0:
        _select_row(s_ptr + row * s_stride, cand_ptr + row * c_stride, idx_ptr + row * i_stride, seq, kb,
                    sample_stride, n_sample, SAMPLE, BLOCK, MARGIN_SIGMAS, PADDED)


@triton.jit(do_not_specialize=["seq", "k_sel", "n_chunks", "tiles_per_chunk", "sample_stride", "n_sample"])
def _bracket_hist_kernel(
    s_ptr, kb_ptr, ck_ptr, cp_ptr, meta_ptr, hist_ptr,
    seq, s_stride, c_stride, p_stride, m_stride, h_stride, k_sel, rows_per_batch, n_chunks, tiles_per_chunk,
    sample_stride, n_sample,
    HAS_KB: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, CP2: tl.constexpr,
    MARGIN_SIGMAS: tl.constexpr, PADDED: tl.constexpr,
):
    """Multi-program selection, pass 1: one chunk of one row per program.

    Every program of a row computes the same bracket (`_bracket`), counts its chunk's keys above it and adds
    where the keys inside it fall (`_bin_shift`: 256 bins of 2^shift keys) to the row's histogram. The last
    program of the row to finish runs `_pick_bin`.
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    kb = (tl.load(kb_ptr + row // rows_per_batch) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    if kb > 0:
        s_row = s_ptr + row * s_stride
        m_row = meta_ptr + row * m_stride
        h_row = hist_ptr + row * h_stride
        lo, hi = _bracket(s_row, seq, kb, sample_stride, n_sample, SAMPLE, MARGIN_SIGMAS)
        lo64 = lo.to(tl.int64)
        shift = _bin_shift(lo, hi)
        bins = tl.arange(0, 256)
        n_gt = tl.zeros([], dtype=tl.int32)
        hist = tl.zeros([256], dtype=tl.int32)
        for t in range(tiles_per_chunk):
            offs = (chunk * tiles_per_chunk + t) * BLOCK + tl.arange(0, BLOCK)
            key, above, mid = _classify_tile(s_row, offs, seq, lo, hi, PADDED)
            n_gt += above
            sub = tl.where(mid, tl.minimum((key.to(tl.int64) - lo64) >> shift, 255).to(tl.int32), 0)
            hist += tl.histogram(sub, 256) - tl.where(bins == 0, BLOCK - tl.sum(mid.to(tl.int32)), 0)
        tl.atomic_add(h_row + bins, hist, mask=hist > 0, sem="relaxed")
        tl.store(m_row + _META + chunk, n_gt)
        tl.debug_barrier()  # all of this program's writes precede its ticket (acquire-release, GPU scope)
        if tl.atomic_add(m_row + 2, 1) == n_chunks - 1:
            _pick_bin(s_row, ck_ptr + row * c_stride, cp_ptr + row * p_stride, m_row, h_row, seq, kb, lo, hi,
                      n_chunks, tiles_per_chunk * BLOCK, CP2, BLOCK, PADDED)


@triton.jit(do_not_specialize=["seq", "k_sel", "n_chunks", "tiles_per_chunk"])
def _bin_collect_kernel(
    s_ptr, kb_ptr, ck_ptr, cp_ptr, meta_ptr,
    seq, s_stride, c_stride, p_stride, m_stride, k_sel, rows_per_batch, n_chunks, tiles_per_chunk,
    HAS_KB: tl.constexpr, CP2: tl.constexpr, BLOCK: tl.constexpr, PADDED: tl.constexpr,
):
    """Multi-program selection, pass 2: one chunk of one row per program (rows pass 1 resolved are skipped).

    Counts the chunk's keys above the threshold bin and appends the keys inside it (with their positions) to
    the row's candidates; the last program of the row runs `_resolve_row` on them.
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    kb = (tl.load(kb_ptr + row // rows_per_batch) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    m_row = meta_ptr + row * m_stride
    if (kb > 0) & (tl.load(m_row + 7) == 0):
        s_row = s_ptr + row * s_stride
        ck_row = ck_ptr + row * c_stride
        cp_row = cp_ptr + row * p_stride
        lo = tl.load(m_row + 4)
        hi = tl.load(m_row + 5)
        n_gt = tl.zeros([], dtype=tl.int32)
        for t in range(tiles_per_chunk):
            offs = (chunk * tiles_per_chunk + t) * BLOCK + tl.arange(0, BLOCK)
            key, above, mid = _classify_tile(s_row, offs, seq, lo, hi, PADDED)
            n_gt += above
            n_mid = tl.sum(mid.to(tl.int32))
            if n_mid > 0:
                dst = tl.atomic_add(m_row + 1, n_mid, sem="relaxed") + tl.cumsum(mid.to(tl.int32), 0) - 1
                tl.store(ck_row + dst, key, mask=mid)
                tl.store(cp_row + dst, offs, mask=mid)
        tl.store(m_row + _META + chunk, n_gt)
        tl.debug_barrier()
        if tl.atomic_add(m_row + 3, 1) == n_chunks - 1:
            chunks = tl.arange(0, CP2)
            gt_c = tl.load(m_row + _META + chunks, mask=chunks < n_chunks, other=0, cache_modifier=".cg")
            _resolve_row(ck_row, cp_row, m_row, tl.load(m_row + 1, cache_modifier=".cg"), tl.load(m_row + 6),
                         gt_c, lo, hi, tiles_per_chunk * BLOCK, n_chunks, CP2, BLOCK)
            tl.store(m_row + 1, 0)
            tl.store(m_row + 3, 0)


@triton.jit(do_not_specialize=["seq", "k_sel", "tiles_per_chunk"])
def _write_kernel(
    s_ptr, kb_ptr, meta_ptr, idx_ptr,
    seq, s_stride, m_stride, i_stride, k_sel, rows_per_batch, tiles_per_chunk,
    HAS_KB: tl.constexpr, CP2: tl.constexpr, BLOCK: tl.constexpr, PADDED: tl.constexpr,
):
    """Multi-program selection, pass 3: each chunk writes its kept positions (key > t, and its share of the
    keys == t, earliest first) at its offset, so each row's positions come out in increasing order."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    kb = (tl.load(kb_ptr + row // rows_per_batch) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    if kb > 0:
        m_row = meta_ptr + row * m_stride
        c0 = chunk * tiles_per_chunk * BLOCK
        _write_positions(s_ptr + row * s_stride, idx_ptr + row * i_stride, c0,
                         tl.minimum(c0 + tiles_per_chunk * BLOCK, seq), tl.load(m_row),
                         tl.load(m_row + _META + 2 * CP2 + chunk), tl.load(m_row + _META + CP2 + chunk),
                         BREAK_TIES=True, BLOCK=BLOCK, PADDED=PADDED)


@triton.jit(do_not_specialize=["k_sel", "tiles_per_prog", "n_split"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, kb_ptr, start_ptr, end_ptr, part_ptr, done_ptr, out_ptr,
    k_sel, i_stride, p_stride, rows_per_batch, kv_div, heads_per_row, tiles_per_prog, n_split, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
    HAS_KB: tl.constexpr, DENSE: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One split of the kept tokens of one selection row: gather K rows by index (DENSE: every valid position,
    kv_start[b] <= s < kv_end[b], with k_sel = S), exact scores for the row's query heads, online softmax, gather
    V rows, p.V. With one split it writes the output; otherwise it writes its (max, sum, acc) and the row's last
    split to finish merges them into the output."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // rows_per_batch).to(tl.int64)
    r = (row % rows_per_batch).to(tl.int64)
    j = r // kv_div
    head0 = r * heads_per_row
    pos0 = 0
    if DENSE:
        pos0 = tl.load(start_ptr + b).to(tl.int32) if HAS_START else 0
        kb = (tl.load(end_ptr + b).to(tl.int32) if HAS_END else k_sel) - pos0
    else:
        kb = tl.load(kb_ptr + b) if HAS_KB else k_sel
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < heads_per_row
    d_ok = offs_d < HEAD_DIM
    q = _load_heads(q_ptr, b, head0, heads_per_row, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, UPCAST)
    n_lo = split * tiles_per_prog * BLOCK_N
    m_i, l_i, acc = _attend(q, k_ptr + b * stride_kb + j * stride_kh, v_ptr + b * stride_vb + j * stride_vh,
                            idx_ptr + row.to(tl.int64) * i_stride, n_lo,
                            tl.minimum(n_lo + tiles_per_prog * BLOCK_N, kb),
                            stride_ks, stride_vs, qk_scale, offs_d, d_ok,
                            tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
                            tl.zeros([BLOCK_G, BLOCK_D], tl.float32), BLOCK_N, DOT_PREC, UPCAST, DENSE, pos0)
    if n_split == 1:
        _store_heads(out_ptr, b, head0, heads_per_row, stride_ob, stride_oh, offs_g, offs_d, d_ok, l_i, acc)
    else:
        part = part_ptr + row.to(tl.int64) * p_stride
        n_part = n_split * heads_per_row
        slot = split * heads_per_row + offs_g
        tl.store(part + slot, m_i, mask=g_ok)
        tl.store(part + n_part + slot, l_i, mask=g_ok)
        tl.store(part + 2 * n_part + slot[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.debug_barrier()  # all partials of this program precede its ticket (acquire-release, GPU scope)
        if tl.atomic_add(done_ptr + row, 1) == n_split - 1:
            _merge_splits(part, out_ptr, b, head0, heads_per_row, n_split, stride_ob, stride_oh,
                          HEAD_DIM, BLOCK_S, BLOCK_D)
            tl.store(done_ptr + row, 0)


@triton.jit(do_not_specialize=["seq", "k_sel", "sample_stride", "n_sample", "sink", "recent"])
def _fused_kernel(
    q_ptr, ka_ptr, k_ptr, v_ptr, dims_ptr, start_ptr, end_ptr, kb_ptr, s_ptr, c_ptr, i_ptr, out_ptr,
    seq, s_stride, c_stride, i_stride, k_sel, rows_per_batch, kv_div, heads_per_row, d_uniform,
    sample_stride, n_sample, qk_scale, sink, recent,
    stride_qb, stride_qh, stride_kab, stride_kah, stride_kas, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
    PER_HEAD_D: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr, HAS_KB: tl.constexpr,
    PROTECT: tl.constexpr, KEY_WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_NS: tl.constexpr, BLOCK_N: tl.constexpr, SAMPLE: tl.constexpr, SELECT_BLOCK: tl.constexpr,
    MARGIN_SIGMAS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The whole step for one selection row (short caches): approximate scores of the row's heads (max over
    the group; +inf at protected positions), the exact top-k_b of `_select_row`, then softmax attention over the
    kept keys and values."""
    row = tl.program_id(0)
    b = (row // rows_per_batch).to(tl.int64)
    r = (row % rows_per_batch).to(tl.int64)
    j = r // kv_div
    head0 = r * heads_per_row
    kb = (tl.load(kb_ptr + b) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if kb > 0:
        s_row = s_ptr + row.to(tl.int64) * s_stride
        i_row = i_ptr + row.to(tl.int64) * i_stride
        d = tl.load(dims_ptr + j) if PER_HEAD_D else d_uniform
        start = tl.load(start_ptr + b) if HAS_START else 0
        end = tl.load(end_ptr + b) if HAS_END else seq
        offs_da = tl.arange(0, BLOCK_DA)
        qa = _load_heads(q_ptr, b, head0, heads_per_row, stride_qb, stride_qh, offs_g, offs_da, d, UPCAST)
        kd_ok = _key_dims(offs_da, d, KEY_WIDTH, BLOCK_DA)
        ka_base = ka_ptr + b * stride_kab + j * stride_kah
        for n0 in range(0, seq, BLOCK_NS):
            offs_n = n0 + tl.arange(0, BLOCK_NS)
            a = _approx_tile(qa, ka_base, stride_kas, offs_n, offs_da, kd_ok, end, start, sink, recent, PROTECT,
                             DOT_PREC, UPCAST)
            a = tl.max(tl.where((offs_g < heads_per_row)[:, None], a, float("-inf")), axis=0)
            tl.store(s_row + offs_n, a, mask=offs_n < _padded_len(seq))  # -inf past seq
        tl.debug_barrier()
        _select_row(s_row, c_ptr + row.to(tl.int64) * c_stride, i_row, seq, kb, sample_stride, n_sample,
                    SAMPLE, SELECT_BLOCK, MARGIN_SIGMAS, PADDED=True)
        tl.debug_barrier()
        q = _load_heads(q_ptr, b, head0, heads_per_row, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, UPCAST)
        m_i, l_i, acc = _attend(q, k_ptr + b * stride_kb + j * stride_kh, v_ptr + b * stride_vb + j * stride_vh,
                                i_row, 0, kb, stride_ks, stride_vs, qk_scale, offs_d, d_ok, m_i, l_i, acc,
                                BLOCK_N, DOT_PREC, UPCAST)
    _store_heads(out_ptr, b, head0, heads_per_row, stride_ob, stride_oh, offs_g, offs_d, d_ok, l_i, acc)


# ---------------------------------------------------------------------------------------------------------------
# Host side of the Triton path
# ---------------------------------------------------------------------------------------------------------------


def _split(n: int, block: int, rows: int, target_programs: int, most: int | None = None) -> tuple[int, int]:
    """(splits per row, tiles per split) for `n` items in tiles of `block`, aiming at `target_programs` in all
    (at most `most` splits per row)."""
    tiles = max(1, triton.cdiv(n, block))
    splits = min(tiles, max(1, triton.cdiv(target_programs, rows)), most or tiles)
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def _launch(cfg: LokiKernelConfig, q: torch.Tensor) -> dict:
    """Launch options shared by the kernels that multiply."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(q))


class _Workspace:
    """Scratch buffers of the Triton path for one (device, stream), kept between calls: 2-D, rows padded
    (kernels take the row stride), grown by half again when too small. Counters are allocated zeroed and the
    kernels reset them after use."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] < cols:
            if buf is not None:
                rows, cols = max(rows, buf.shape[0]), max(cols, buf.shape[1] * 3 // 2)
            shape = (rows, triton.cdiv(cols, 64) * 64)
            buf = torch.zeros(shape, dtype=dtype, device=self.device) if zeros else \
                torch.empty(shape, dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf


_WORKSPACES: dict[tuple, _Workspace] = {}


def _workspace(device: torch.device) -> _Workspace:
    """The scratch buffers for `device` and its current stream."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    ws = _WORKSPACES.get((device, stream))
    if ws is None:
        ws = _WORKSPACES[(device, stream)] = _Workspace(device)
    return ws


def workspace_buffers(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The scratch buffers that calls on the current stream of `device` use: a CUDA graph that captured such
    calls must keep them alive."""
    return tuple(_workspace(device).buffers.values())


def clear_workspaces() -> None:
    """Free the scratch buffers that the Triton path keeps between calls (they are rebuilt on demand)."""
    _WORKSPACES.clear()


def triton_scores(p: _Problem, q: torch.Tensor, keys: torch.Tensor, kv_start: torch.Tensor | None,
                  kv_end: torch.Tensor | None, cfg: LokiKernelConfig) -> torch.Tensor:
    """Stage 1: approximate scores, float32 [B*Hkv, S] ("group", max over the group) or [B*Hq, S] ("query"),
    from `keys` [B, Hkv, S, d'] (the key cache or its narrow copy); -inf outside [kv_start, kv_end), +inf at the
    protected positions. A view of the workspace, valid until the next call."""
    b, hkv, g, s = p.batch, p.kv_heads, p.group_size, p.seq
    rows = b * p.rows_per_batch
    scores = _workspace(q.device).get("scores", rows, s, torch.float32)
    n_split, tiles = _split(s, cfg.block_n_scores, b * hkv, cfg.programs_per_sm * num_sms(q.device))
    _approx_scores_kernel[(b * hkv, n_split)](
        q, keys, p.dims if p.dims is not None else scores, kv_start if kv_start is not None else scores,
        kv_end if kv_end is not None else scores, scores,
        s, scores.stride(0), hkv, g, tiles, p.d_max, p.sink, p.recent,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        GROUP=p.group, PER_HEAD_D=p.dims is not None, HAS_START=kv_start is not None, HAS_END=kv_end is not None,
        PROTECT=p.protect, KEY_WIDTH=keys.shape[-1],
        BLOCK_G=dot_block(g), BLOCK_D=dot_block(p.d_max), BLOCK_N=cfg.block_n_scores, **_launch(cfg, q),
    )
    return scores[:rows, :s]


def _rows_padded(scores: torch.Tensor) -> bool:
    """Whether every row of `scores` [rows, S] can be read up to S rounded up to 16 without leaving its storage
    (true of the workspace), which lets the selection kernels load with 16-aligned masks (what lies past S is
    masked after the load)."""
    rows, s = scores.shape
    end = scores.storage_offset() + (rows - 1) * scores.stride(0) + -(-s // 16) * 16
    return end * scores.element_size() <= scores.untyped_storage().nbytes()


def one_program_select(rows: int, seq: int, cfg: LokiKernelConfig, device: torch.device) -> bool:
    """Whether `select_tokens` runs one program per row (rows up to `cfg.select_kernel_max_seq` long, at least
    `cfg.select_kernel_min_rows_per_sm` of them per SM) rather than several."""
    return seq <= cfg.select_kernel_max_seq and rows >= cfg.select_kernel_min_rows_per_sm * num_sms(device)


def select_tokens(scores: torch.Tensor, k: int, k_b: torch.Tensor | None, rows_per_batch: int,
                  cfg: LokiKernelConfig) -> torch.Tensor:
    """Stage 2: int32 [rows, k] positions of the k_b best scores of each row of float32 `scores` [rows, S]
    (stride(-1) == 1; row r belongs to sequence r // rows_per_batch; k_b = k without padding; entries past k_b
    are unused), in increasing order, ties at the threshold to the earliest positions. One program per row or
    several (`one_program_select`). A view of the workspace, valid until the next call."""
    rows, s = scores.shape
    ws = _workspace(scores.device)
    padded = _rows_padded(scores)
    idx = ws.get("idx", rows, k, torch.int32)
    cand = ws.get("cand", rows, s, torch.int32)
    kb_arg = k_b if k_b is not None else idx
    if one_program_select(rows, s, cfg, scores.device):
        stride = max(1, s // cfg.select_sample)
        _select_kernel[(rows,)](
            scores, kb_arg, cand, idx,
            s, scores.stride(0), cand.stride(0), idx.stride(0), k, rows_per_batch, stride,
            min(cfg.select_sample, triton.cdiv(s, stride)),
            HAS_KB=k_b is not None, SAMPLE=cfg.select_sample, BLOCK=cfg.select_block, MARGIN_SIGMAS=5.0,
            PADDED=padded, num_warps=cfg.select_warps,
        )
        return idx[:rows, :k]
    block = cfg.multi_select_block
    n_chunks, tiles = _split(s, block, rows, cfg.programs_per_sm * num_sms(scores.device),
                             cfg.multi_select_max_chunks)
    cp2 = dot_block(n_chunks)
    cand_pos = ws.get("cand_pos", rows, s, torch.int32)
    meta = ws.get("select_meta", rows, _META.value + 3 * cp2, torch.int32, zeros=True)
    hist = ws.get("select_hist", rows, _SUB_BINS, torch.int32, zeros=True)
    stride = max(1, s // cfg.multi_select_sample)
    _bracket_hist_kernel[(rows, n_chunks)](
        scores, kb_arg, cand, cand_pos, meta, hist,
        s, scores.stride(0), cand.stride(0), cand_pos.stride(0), meta.stride(0), hist.stride(0), k, rows_per_batch,
        n_chunks, tiles,
        stride, min(cfg.multi_select_sample, triton.cdiv(s, stride)),
        HAS_KB=k_b is not None, SAMPLE=cfg.multi_select_sample, BLOCK=block, CP2=cp2, MARGIN_SIGMAS=5.0,
        PADDED=padded, num_warps=cfg.multi_select_warps,
    )
    _bin_collect_kernel[(rows, n_chunks)](
        scores, kb_arg, cand, cand_pos, meta, s, scores.stride(0), cand.stride(0), cand_pos.stride(0),
        meta.stride(0), k, rows_per_batch, n_chunks, tiles,
        HAS_KB=k_b is not None, CP2=cp2, BLOCK=block, PADDED=padded, num_warps=cfg.multi_select_warps,
    )
    _write_kernel[(rows, n_chunks)](
        scores, kb_arg, meta, idx, s, scores.stride(0), meta.stride(0), idx.stride(0), k, rows_per_batch, tiles,
        HAS_KB=k_b is not None, CP2=cp2, BLOCK=block, PADDED=padded, num_warps=cfg.multi_select_warps,
    )
    return idx[:rows, :k]


def triton_attend(p: _Problem, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, idx: torch.Tensor,
                  scaling: float, cfg: LokiKernelConfig, out: torch.Tensor) -> torch.Tensor:
    """Stage 3: exact attention over the rows `idx` [rows, k] (the first k_b of each row) of K and V
    [B, Hkv, S, D] into `out` [B, Hq, D] (split-K; the last split of each row merges)."""
    rows, k = idx.shape
    heads_per_row = p.group_size if p.group else 1
    _launch_attention(q, k_cache, v_cache, out, scaling, cfg, rows, p.rows_per_batch, heads_per_row, k, idx=idx,
                      k_b=p.k_b)
    return out


def _launch_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      scaling: float, cfg: LokiKernelConfig, rows: int, rows_per_batch: int, heads_per_row: int,
                      k: int, idx: torch.Tensor | None = None, k_b: torch.Tensor | None = None,
                      kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None) -> None:
    """Launch `_attention_kernel` over `rows` rows of `heads_per_row` query heads: over the positions `idx`
    [rows, >= k] (the first k_b or k of each row), or, without idx, densely over [kv_start, kv_end) of all k = S."""
    n_split, tiles = _split(k, cfg.block_n_attn, rows, cfg.programs_per_sm * num_sms(q.device))
    ws = _workspace(q.device)
    part = ws.get("partials", rows, n_split * heads_per_row * (q.shape[-1] + 2), torch.float32)
    done = ws.get("attend_done", 1, rows, torch.int32, zeros=True)
    dummy = part  # pointer arguments a constexpr switches off
    _attention_kernel[(rows, n_split)](
        q, k_cache, v_cache, dummy if idx is None else idx, dummy if k_b is None else k_b,
        dummy if kv_start is None else kv_start, dummy if kv_end is None else kv_end, part, done, out,
        k, 0 if idx is None else idx.stride(0), part.stride(0), rows_per_batch,
        1 if heads_per_row > 1 else q.shape[1] // k_cache.shape[1], heads_per_row, tiles, n_split, scaling * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        HAS_KB=k_b is not None, DENSE=idx is None, HAS_START=kv_start is not None, HAS_END=kv_end is not None,
        HEAD_DIM=q.shape[-1], BLOCK_G=dot_block(heads_per_row), BLOCK_D=dot_block(q.shape[-1]),
        BLOCK_N=cfg.block_n_attn, BLOCK_S=min(32, triton.next_power_of_2(n_split)),
        **{**_launch(cfg, q), "num_warps": cfg.attn_warps},
    )


def _check_dense(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor | None,
                 kv_end: torch.Tensor | None) -> None:
    """Validate the arguments of `dense_decode_attention`."""
    _check_tensors(q, k_cache, v_cache)
    for name, x in (("kv_start", kv_start), ("kv_end", kv_end)):
        _check_int_tensor(name, x, q.shape[0], q.device)


def dense_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
                                  kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """`dense_decode_attention` with the split-K Triton kernel (bf16/fp16/fp32; CUDA, or CPU under
    TRITON_INTERPRET=1): each KV head's G query heads in one pass over its keys. `out` as in
    `loki_decode_attention_triton`."""
    _check_dense(q, k_cache, v_cache, kv_start, kv_end)
    b, hq, _ = q.shape
    hkv, s = k_cache.shape[1:3]
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton path takes {_TRITON_DTYPES}, got {q.dtype}: use dense_decode_attention_torch")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if s == 0:
        return out.zero_()
    _launch_attention(q, k_cache, v_cache, out, scaling, _DEFAULT_CONFIG, b * hkv, hkv, hq // hkv, s,
                      kv_start=kv_start, kv_end=kv_end)
    return out


def dense_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
                           kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of one query token per sequence over the valid keys of a cache (a decode step whose budget
    keeps every key): q [B, Hq, D], k_cache / v_cache [B, Hkv, S, D] (GQA: query head h reads KV head h // G; keys
    and queries in any one basis); kv_start / kv_end: int [B] on q's device, the valid range [kv_start, kv_end)
    (None: 0 / S; read on the device, no host sync: a CUDA graph replays it as the cache grows). Returns
    [B, Hq, D] in q.dtype (0 for a sequence without valid keys). CUDA bf16/fp16/fp32 runs the Triton kernel,
    anything else PyTorch."""
    impl = dense_decode_attention_triton if q.is_cuda and q.dtype in _TRITON_DTYPES else dense_decode_attention_torch
    return impl(q, k_cache, v_cache, scaling=scaling, kv_start=kv_start, kv_end=kv_end)


def dense_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
                                 kv_start: torch.Tensor | None = None,
                                 kv_end: torch.Tensor | None = None) -> torch.Tensor:
    """`dense_decode_attention` in PyTorch (the reference; any device and dtype, float64 included)."""
    _check_dense(q, k_cache, v_cache, kv_start, kv_end)
    b, hq, dh = q.shape
    hkv, s = k_cache.shape[1:3]
    acc = torch.promote_types(q.dtype, torch.float32)
    pos = torch.arange(s, device=q.device)[None, :]
    valid = (pos >= (0 if kv_start is None else kv_start[:, None].long())) & \
        (pos < (s if kv_end is None else kv_end[:, None].long()))  # [B or 1, S]
    qg = q.reshape(b, hkv, hq // hkv, dh).to(acc)
    logits = torch.matmul(qg, k_cache.to(acc).transpose(-1, -2)) * scaling  # [B, Hkv, G, S]
    logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    v = v_cache.to(acc).masked_fill(~valid[:, None, :, None], 0.0)  # unwritten memory past kv_end may hold NaN
    return torch.matmul(probs, v).reshape(b, hq, dh).to(q.dtype)


def triton_fused(p: _Problem, q: torch.Tensor, keys: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, scaling: float, cfg: LokiKernelConfig,
                 out: torch.Tensor) -> torch.Tensor:
    """All three stages in one kernel, one program per selection row, into `out` [B, Hq, D] (for short
    caches)."""
    rows, s, k, k_b = p.batch * p.rows_per_batch, p.seq, p.k, p.k_b
    ws = _workspace(q.device)
    scores = ws.get("scores", rows, s, torch.float32)
    cand = ws.get("cand", rows, s, torch.int32)
    idx = ws.get("idx", rows, k, torch.int32)
    heads_per_row = p.group_size if p.group else 1
    stride = max(1, s // cfg.select_sample)
    _fused_kernel[(rows,)](
        q, keys, k_cache, v_cache, p.dims if p.dims is not None else scores,
        kv_start if kv_start is not None else scores, kv_end if kv_end is not None else scores,
        k_b if k_b is not None else idx, scores, cand, idx, out,
        s, scores.stride(0), cand.stride(0), idx.stride(0), k, p.rows_per_batch, 1 if p.group else p.group_size,
        heads_per_row, p.d_max, stride, min(cfg.select_sample, triton.cdiv(s, stride)), scaling * _LOG2E,
        p.sink, p.recent, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1),
        PER_HEAD_D=p.dims is not None, HAS_START=kv_start is not None, HAS_END=kv_end is not None,
        HAS_KB=k_b is not None, PROTECT=p.protect, KEY_WIDTH=keys.shape[-1], HEAD_DIM=p.head_dim,
        BLOCK_G=dot_block(heads_per_row),
        BLOCK_DA=dot_block(p.d_max), BLOCK_D=dot_block(p.head_dim), BLOCK_NS=cfg.block_n_fused,
        BLOCK_N=cfg.block_n_fused_attn, SAMPLE=cfg.select_sample, SELECT_BLOCK=cfg.select_block, MARGIN_SIGMAS=5.0,
        **{**_launch(cfg, q), "num_warps": cfg.fused_warps},
    )
    return out


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
) -> torch.Tensor:
    """Loki decode step with the Triton kernels (bf16/fp16/fp32; CUDA, or CPU under TRITON_INTERPRET=1).
    Same arguments and result as `loki_decode_attention`; `config` overrides the launch settings; `out`
    ([B, Hq, D] in q.dtype, last dim contiguous) receives the result when given."""
    p = _check(q, k_cache, v_cache, d, k, k_b, sink, recent, kv_start, kv_end, gqa_select, k_approx)
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton path takes {_TRITON_DTYPES}, got {q.dtype}: use loki_decode_attention_torch")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with stride(-1) == 1")
    if k == 0:
        return out.zero_()
    cfg = config or _DEFAULT_CONFIG
    keys = k_cache if k_approx is None else k_approx
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if p.seq <= (cfg.graph_fused_max_seq if capturing else cfg.fused_max_seq):
        return triton_fused(p, q, keys, k_cache, v_cache, kv_start, kv_end, scaling, cfg, out)
    scores = triton_scores(p, q, keys, kv_start, kv_end, cfg)
    idx = select_tokens(scores, k, p.k_b, p.rows_per_batch, cfg)
    return triton_attend(p, q, k_cache, v_cache, idx, scaling, cfg, out)


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
    Returns [B, Hq, D] in q.dtype (0 for a sequence that keeps no key). CUDA bf16/fp16/fp32 runs the Triton
    kernels, anything else PyTorch.
    """
    impl = loki_decode_attention_triton if q.is_cuda and q.dtype in _TRITON_DTYPES else loki_decode_attention_torch
    return impl(q, k_cache, v_cache, d=d, k=k, scaling=scaling, k_b=k_b, sink=sink, recent=recent,
                kv_start=kv_start, kv_end=kv_end, gqa_select=gqa_select, k_approx=k_approx)
