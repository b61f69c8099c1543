"""Loki sparse attention for one decode step: Triton kernels on CUDA, a PyTorch implementation elsewhere.

Every path computes the same function. With a query ``q [B, Hq, D]`` rotated into the PCA basis of its KV head
and a cache of rotated keys and values ``[B, Hkv, S, D]`` (GQA: query head ``h`` reads KV head ``h // G``):

1. approximate scores ``a = q[:d_j] . k[:, :d_j]`` over the first ``d_j`` principal dims of KV head ``j``;
2. top ``k_b = num_tokens(n_b, k_frac)`` valid tokens (``n_b = S - kv_start[b]``), per query head
   (``gqa_select="query"``) or per KV head on the max of ``a`` over its G query heads (``"group"``);
3. exact softmax attention (all D dims, ``scaling``) over the kept tokens, accumulated in float32.

The Triton path runs four kernels: approximate scores for all G heads of a KV head in one pass over the keys
(split over S); an exact top-k per selection row (sample-bracketed radix select, ties to the earliest positions;
rows longer than `LokiKernelConfig.select_kernel_max_seq` use torch.topk instead) that writes the kept positions;
a split-K kernel that gathers the kept keys and values by position and keeps an online softmax; and a small
kernel that merges the splits. The PyTorch path selects with ``torch.topk``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..loki.budget import check_fraction, max_tokens, num_tokens

GQA_SELECT = ("query", "group")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # smallest tl.dot dimension


@dataclass(frozen=True)
class LokiKernelConfig:
    """Launch settings of the Triton path (block sizes in tokens; splits aim at `programs_per_sm` per SM)."""

    block_n_scores: int = 64
    block_n_attn: int = 32
    programs_per_sm: int = 4
    num_warps: int = 4
    num_stages: int = 3
    select_block: int = 2048  # scores per tile of the selection kernel
    select_sample: int = 2048  # strided sample that brackets the k-th score
    select_warps: int = 8
    # Longer rows select with torch.topk: one program per row of the selection kernel is slower there
    # (H100: 0.17 vs 0.12 ms at B=8, S=64k; 0.31 vs 0.09 ms at B=1, S=128k; faster at S=16k: 0.055 vs 0.095).
    select_kernel_max_seq: int = 32768


@dataclass(frozen=True)
class _Problem:
    """Validated arguments: sizes, the budget and the per-head dims."""

    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    d_max: int
    dims: torch.Tensor | None  # int [Hkv] when heads use different d, else None (all use d_max)
    k_frac: float
    group: bool

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


def _check(q, k_cache, v_cache, d, k_frac, kv_start, gqa_select) -> _Problem:
    """Validate the arguments of `loki_decode_attention`; raise ValueError/TypeError saying what to fix."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [B, Hkv, S, D]; got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    b, hq, dh = q.shape
    _, hkv, s, _ = k_cache.shape
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
    if gqa_select not in GQA_SELECT:
        raise ValueError(f"gqa_select must be one of {GQA_SELECT}, got {gqa_select!r}")
    k_frac = check_fraction("k_frac", k_frac)
    if kv_start is not None:
        if kv_start.shape != (b,) or kv_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_start must be an int32/int64 tensor [B={b}], got {kv_start.dtype} "
                             f"{tuple(kv_start.shape)}")
        if kv_start.device != q.device:
            raise ValueError(f"kv_start is on {kv_start.device}, q on {q.device}: move it to q's device")
    if isinstance(d, torch.Tensor):
        if d.shape != (hkv,) or d.dtype.is_floating_point or d.dtype == torch.bool:
            raise ValueError(f"per-head d must be an int tensor [Hkv={hkv}], got {d.dtype} {tuple(d.shape)}")
        d = tuple(d.tolist())  # a host sync when d is on the GPU: keep it on the CPU or pass a tuple of ints
    if isinstance(d, (tuple, list)):
        if len(d) != hkv or not all(isinstance(x, int) and not isinstance(x, bool) for x in d):
            raise ValueError(f"per-head d must hold {hkv} ints (one per KV head), got {d!r}")
        d_min, d_max = min(d), max(d)
    elif isinstance(d, int) and not isinstance(d, bool):
        d_min = d_max = d
    else:
        raise TypeError(f"d must be an int, or ints per KV head (tuple or int tensor [Hkv]), got {type(d).__name__}")
    if not 1 <= d_min <= d_max <= dh:
        raise ValueError(f"d must lie in [1, D={dh}], got values in [{d_min}, {d_max}]")
    dims = _dims_on(q.device, tuple(d)) if d_min != d_max else None
    return _Problem(b, hq, hkv, s, dh, d_max, dims, k_frac, gqa_select == "group")


@functools.lru_cache(maxsize=64)
def _dims_on(device: torch.device, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-head dims as int32 [Hkv] on `device`, copied once (no host-to-device copy per decode step)."""
    return torch.tensor(dims, dtype=torch.int32, device=device)


def _budget(p: _Problem, kv_start: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """(k, k_b): tokens kept per row without padding, or the bound `k` and per-sequence k_b int32 [B]."""
    k = max_tokens(p.seq, p.k_frac) if p.seq else 0
    if kv_start is None:
        return k, None
    return k, num_tokens(p.seq - kv_start, p.k_frac).clamp_min(0).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch implementation
# ---------------------------------------------------------------------------------------------------------------


def loki_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    d: int | tuple[int, ...] | torch.Tensor,
    k_frac: float,
    scaling: float,
    kv_start: torch.Tensor | None = None,
    gqa_select: str = "group",
) -> torch.Tensor:
    """Loki decode step in PyTorch (any device; also float64). Same arguments and result as
    `loki_decode_attention`. Reads the first d dims of the keys and gathers only the kept rows of K and V."""
    p = _check(q, k_cache, v_cache, d, k_frac, kv_start, gqa_select)
    b, hkv, g, s = p.batch, p.kv_heads, p.group_size, p.seq
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, hkv, g, p.head_dim).to(acc_dtype)  # [B, Hkv, G, D]
    k, k_b = _budget(p, kv_start)
    if k == 0:
        return q.new_zeros(q.shape)

    q_approx = qg[..., : p.d_max]
    if p.dims is not None:
        keep = torch.arange(p.d_max, device=q.device) < p.dims[:, None]  # [Hkv, d_max]
        q_approx = q_approx * keep[None, :, None]
    k_approx = k_cache[..., : p.d_max].to(acc_dtype)  # [B, Hkv, S, d_max]
    scores = torch.matmul(q_approx, k_approx.transpose(-1, -2))  # [B, Hkv, G, S]
    if kv_start is not None:
        invalid = torch.arange(s, device=q.device)[None, :] < kv_start[:, None]  # [B, S]
        scores = scores.masked_fill(invalid[:, None, None], float("-inf"))
    if p.group:
        scores = scores.amax(dim=2, keepdim=True)  # [B, Hkv, 1, S]
    idx = scores.topk(k, dim=-1, sorted=kv_start is not None).indices  # [B, Hkv, G or 1, k]

    rows = idx.shape[2]
    gather = idx[..., None].expand(b, hkv, rows, k, p.head_dim)
    k_sel = k_cache[:, :, None].expand(b, hkv, rows, s, p.head_dim).gather(3, gather).to(acc_dtype)
    v_sel = v_cache[:, :, None].expand(b, hkv, rows, s, p.head_dim).gather(3, gather).to(acc_dtype)
    if rows == g:  # query selection: each head has its own rows  [B, Hkv, G, k, D]
        logits = torch.matmul(qg[..., None, :], k_sel.transpose(-1, -2)).squeeze(-2)  # [B, Hkv, G, k]
    else:  # group selection: shared rows [B, Hkv, 1, k, D]
        logits = torch.matmul(qg, k_sel[:, :, 0].transpose(-1, -2))  # [B, Hkv, G, k]
    logits = logits * scaling
    if k_b is not None:
        dead = torch.arange(k, device=q.device)[None, :] >= k_b[:, None]  # [B, k]
        logits = logits.masked_fill(dead[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    if rows == g:
        out = torch.matmul(probs[..., None, :], v_sel).squeeze(-2)
    else:
        out = torch.matmul(probs, v_sel[:, :, 0])
    return out.reshape(b, p.q_heads, p.head_dim).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _approx_scores_kernel(
    q_ptr, k_ptr, dims_ptr, start_ptr, s_ptr,
    seq, kv_heads, group_size, tiles_per_prog, d_uniform,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
    GROUP: tl.constexpr, PER_HEAD_D: tl.constexpr, HAS_START: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Scores of the G query heads of one KV head over one split of S, on the first d dims only.

    Writes float32 [B*Hkv, S] (max over the group) or [B*Hq, S] (per query head); -inf before kv_start.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)
    j = (row % kv_heads).to(tl.int64)
    d = tl.load(dims_ptr + j) if PER_HEAD_D else d_uniform
    start = tl.load(start_ptr + b) if HAS_START else 0
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < group_size
    # q is masked to the exact d; keys are read in whole 8-element (16-byte) groups so the loads stay vectorized
    # (a mask against a runtime d would split them into scalar loads). The extra key dims meet zeros of q.
    q = tl.load(q_ptr + b * stride_qb + (j * group_size + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & (offs_d < d)[None, :], other=0.0)
    d_ok = (offs_d // 8) < tl.cdiv(d, 8)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + j * stride_kh
    for t in range(tiles_per_prog):
        offs_n = (split * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq
        keys = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                       mask=in_seq[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            keys = keys.to(tl.float32)
        a = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC)  # [BLOCK_G, BLOCK_N] float32
        valid = in_seq & (offs_n >= start)
        if GROUP:
            a = tl.max(tl.where(g_ok[:, None], a, float("-inf")), axis=0)
            tl.store(s_ptr + row.to(tl.int64) * seq + offs_n, tl.where(valid, a, float("-inf")), mask=in_seq)
        else:
            out = s_ptr + (row.to(tl.int64) * group_size + offs_g)[:, None] * seq + offs_n[None, :]
            tl.store(out, tl.where(valid[None, :], a, float("-inf")), mask=g_ok[:, None] & in_seq[None, :])


@triton.jit
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, kb_ptr, m_ptr, l_ptr, acc_ptr,
    k_sel, rows_per_batch, kv_div, heads_per_row, tiles_per_prog, n_split, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    HAS_KB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One split of the kept tokens of one selection row: gather K rows by index, exact scores for the row's
    query heads, online softmax (base 2), gather V rows, p.V. Writes the split's (max, sum, acc) in float32."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // rows_per_batch).to(tl.int64)
    r = (row % rows_per_batch).to(tl.int64)
    j = r // kv_div
    kb = tl.load(kb_ptr + b) if HAS_KB else k_sel
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < heads_per_row
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + (r * heads_per_row + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + j * stride_kh
    v_base = v_ptr + b * stride_vb + j * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t in range(tiles_per_prog):
        offs_n = (split * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = offs_n < kb
        idx = tl.load(idx_ptr + row.to(tl.int64) * k_sel + offs_n, mask=live, other=0)
        tile_mask = live[:, None] & d_ok[None, :]
        keys = tl.load(k_base + idx[:, None] * stride_ks + offs_d[None, :], mask=tile_mask, other=0.0)
        if UPCAST:
            keys = keys.to(tl.float32)
        s = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC) * qk_scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vals = tl.load(v_base + idx[:, None] * stride_vs + offs_d[None, :], mask=tile_mask, other=0.0)
        p = p.to(vals.dtype)
        if UPCAST:
            p, vals = p.to(tl.float32), vals.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, vals, input_precision=DOT_PREC)
        m_i = m_new
    slot = (row * n_split + split) * heads_per_row + offs_g
    tl.store(m_ptr + slot, m_i, mask=g_ok)
    tl.store(l_ptr + slot, l_i, mask=g_ok)
    tl.store(acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _order_key(score):
    """float32 -> int32 whose signed order is the order of the floats (NaN aside)."""
    bits = score.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_kernel(
    s_ptr, kb_ptr, cand_ptr, idx_ptr,
    seq, k_sel, rows_per_batch, sample_stride, n_sample,
    HAS_KB: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, MARGIN_SIGMAS: tl.constexpr,
):
    """Exact top-k_b of one row of scores [S] -> its positions in increasing order (int32 [k]).

    A sorted strided sample brackets the k_b-th largest score: one pass counts the scores above the bracket
    and copies the keys inside it to `cand`; if the bracket misses (unlucky sample), every key becomes a
    candidate. A radix select (4 x 8 bits) over the candidates gives the exact threshold key t; the last pass
    writes the positions with key > t and, of those with key == t, the first ones, up to k_b in all.
    """
    row = tl.program_id(0).to(tl.int64)
    kb = (tl.load(kb_ptr + row // rows_per_batch) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    if kb > 0:
        s_row = s_ptr + row * seq
        c_row = cand_ptr + row * seq
        offs_m = tl.arange(0, SAMPLE)
        sample = tl.load(s_row + offs_m * sample_stride, mask=offs_m < n_sample, other=float("-inf"))
        sample = tl.sort(_order_key(sample), descending=True)
        frac = kb.to(tl.float32) / seq
        center = frac * n_sample - 1.0  # sample index of the k_b-th largest score, in expectation
        margin = MARGIN_SIGMAS * tl.sqrt(n_sample * frac * (1.0 - frac)) + 2.0
        hi_at = tl.floor(center - margin).to(tl.int32)
        lo_at = tl.ceil(center + margin).to(tl.int32)
        hi = tl.where(hi_at >= 0, tl.sum(tl.where(offs_m == hi_at, sample, 0)), 2147483647)
        lo = tl.where(lo_at < n_sample, tl.sum(tl.where(offs_m == lo_at, sample, 0)), -2147483648)

        n_hi = tl.zeros([], dtype=tl.int32)
        n_mid = tl.zeros([], dtype=tl.int32)
        for start in range(0, seq, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < seq
            key = _order_key(tl.load(s_row + offs, mask=ok, other=float("-inf")))
            mid = ok & (key >= lo) & (key <= hi)
            tl.store(c_row + n_mid + tl.cumsum(mid.to(tl.int32), 0) - 1, key, mask=mid)
            n_mid += tl.sum(mid.to(tl.int32))
            n_hi += tl.sum((ok & (key > hi)).to(tl.int32))
        if (n_hi >= kb) | (n_hi + n_mid < kb):  # the sample misled: all keys are candidates
            for start in range(0, seq, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                ok = offs < seq
                tl.store(c_row + offs, _order_key(tl.load(s_row + offs, mask=ok, other=0.0)), mask=ok)
            n_hi = n_hi * 0
            n_mid = n_mid * 0 + seq

        need = kb - n_hi  # rank of the threshold among the candidates (1 = largest)
        prefix = tl.zeros([], dtype=tl.int64)  # radix digits of the threshold on the unsigned key
        bins = tl.arange(0, 256)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n_mid, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                ok = offs < n_mid
                u = tl.load(c_row + offs, mask=ok, other=0).to(tl.int64) + 2147483648
                match = ok & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
                digit = tl.where(match, (u >> shift) & 255, 0).to(tl.int32)
                misses = BLOCK - tl.sum(match.to(tl.int32))
                hist += tl.histogram(digit, 256) - tl.where(bins == 0, misses, 0)
            at_least = tl.cumsum(hist, 0, reverse=True)  # candidates (matching so far) with digit >= bin
            chosen = tl.max(tl.where(at_least >= need, bins, -1))
            need -= tl.sum(tl.where(bins > chosen, hist, 0))
            prefix += chosen.to(tl.int64) << shift
            n_equal = tl.sum(tl.where(bins == chosen, hist, 0))  # after the last digit: keys equal to t
        t = (prefix - 2147483648).to(tl.int32)  # the k_b-th largest key; take `need` of the keys equal to it
        i_row = idx_ptr + row * k_sel
        if n_equal == need:  # no tie to break (the usual case): every key >= t
            _write_positions(s_row, i_row, seq, t, need, BREAK_TIES=False, BLOCK=BLOCK)
        else:
            _write_positions(s_row, i_row, seq, t, need, BREAK_TIES=True, BLOCK=BLOCK)


@triton.jit
def _write_positions(s_row, i_row, seq, t, need, BREAK_TIES: tl.constexpr, BLOCK: tl.constexpr):
    """Write, in increasing order, the positions with key > t and the first `need` positions with key == t."""
    n_out = tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    for start in range(0, seq, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < seq
        key = _order_key(tl.load(s_row + offs, mask=ok, other=float("-inf")))
        if BREAK_TIES:
            eq = ok & (key == t)
            take = (ok & (key > t)) | (eq & (n_eq + tl.cumsum(eq.to(tl.int32), 0) <= need))
            n_eq += tl.sum(eq.to(tl.int32))
        else:
            take = ok & (key >= t)
        tl.store(i_row + n_out + tl.cumsum(take.to(tl.int32), 0) - 1, offs, mask=take)
        n_out += tl.sum(take.to(tl.int32))


@triton.jit
def _merge_splits_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    n_split, heads_per_row, q_heads, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits (0 where nothing was kept)."""
    o = tl.program_id(0)
    row = o // heads_per_row
    g = o % heads_per_row
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_split
    slot = (row * n_split + offs_s) * heads_per_row + g
    m = tl.load(m_ptr + slot, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + slot, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(w * l, axis=0)
    acc = tl.load(acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    num = tl.sum(w[:, None] * acc, axis=0)
    res = tl.where(denom > 0, num / tl.where(denom > 0, denom, 1.0), 0.0)
    b = (o // q_heads).to(tl.int64)
    h = o % q_heads
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton interpreter on the CPU: few programs keep tests fast
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(n: int, block: int, rows: int, target_programs: int) -> tuple[int, int]:
    """(splits per row, tiles per split) for `n` items in tiles of `block`, aiming at `target_programs` in all."""
    tiles = max(1, triton.cdiv(n, block))
    splits = min(tiles, max(1, triton.cdiv(target_programs, rows)))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def _launch(cfg: LokiKernelConfig, q: torch.Tensor) -> dict:
    """Launch options shared by the two main kernels."""
    # The CPU interpreter (tests) mis-multiplies bf16 in tl.dot: there, dot operands are upcast to float32.
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, UPCAST=q.device.type == "cpu",
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


def triton_scores(p: _Problem, q: torch.Tensor, k_cache: torch.Tensor, kv_start: torch.Tensor | None,
                  cfg: LokiKernelConfig) -> torch.Tensor:
    """Stage 1: approximate scores, float32 [B*Hkv, S] ("group", max over the group) or [B*Hq, S] ("query")."""
    b, hkv, g, s = p.batch, p.kv_heads, p.group_size, p.seq
    scores = torch.empty((b * hkv if p.group else b * p.q_heads, s), device=q.device, dtype=torch.float32)
    n_split, tiles = _split(s, cfg.block_n_scores, b * hkv, cfg.programs_per_sm * _num_sms(q.device))
    _approx_scores_kernel[(b * hkv, n_split)](
        q, k_cache, p.dims if p.dims is not None else scores, kv_start if kv_start is not None else scores, scores,
        s, hkv, g, tiles, p.d_max,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=p.group, PER_HEAD_D=p.dims is not None, HAS_START=kv_start is not None,
        BLOCK_G=max(_MIN_DOT, triton.next_power_of_2(g)), BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(p.d_max)),
        BLOCK_N=cfg.block_n_scores, **_launch(cfg, q),
    )
    return scores


def select_tokens(scores: torch.Tensor, k: int, k_b: torch.Tensor | None, rows_per_batch: int,
                  cfg: LokiKernelConfig) -> torch.Tensor:
    """Stage 2: [rows, k] positions of the k_b best scores of each row of float32 `scores` [rows, S] (row r
    belongs to sequence r // rows_per_batch; k_b = k without padding; entries past k_b are unused).

    Rows up to `cfg.select_kernel_max_seq` use the selection kernel (int32, increasing positions, ties at the
    threshold to the earliest positions); longer rows use torch.topk (int64; sorted when budgets differ, so the
    first k_b are the best; ties in torch's order).
    """
    rows, s = scores.shape
    if s > cfg.select_kernel_max_seq:
        return scores.topk(k, dim=-1, sorted=k_b is not None).indices
    idx = torch.empty((rows, k), device=scores.device, dtype=torch.int32)
    cand = torch.empty((rows, s), device=scores.device, dtype=torch.int32)
    stride = max(1, s // cfg.select_sample)
    _select_kernel[(rows,)](
        scores, k_b if k_b is not None else idx, cand, idx,
        s, k, rows_per_batch, stride, min(cfg.select_sample, triton.cdiv(s, stride)),
        HAS_KB=k_b is not None, SAMPLE=cfg.select_sample, BLOCK=cfg.select_block, MARGIN_SIGMAS=5.0,
        num_warps=cfg.select_warps,
    )
    return idx


def triton_attend(p: _Problem, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, idx: torch.Tensor,
                  k_b: torch.Tensor | None, scaling: float, cfg: LokiKernelConfig, out: torch.Tensor) -> torch.Tensor:
    """Stage 3: exact attention over the rows `idx` [rows, k] of K and V (split-K, then a merge) into `out`."""
    b, hq, dh = p.batch, p.q_heads, p.head_dim
    rows, k = idx.shape
    heads_per_row = p.group_size if p.group else 1
    n_split, tiles = _split(k, cfg.block_n_attn, rows, cfg.programs_per_sm * _num_sms(q.device))
    m = torch.empty((rows, n_split, heads_per_row), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty((rows, n_split, heads_per_row, dh), device=q.device, dtype=torch.float32)
    block_d = max(_MIN_DOT, triton.next_power_of_2(dh))
    _sparse_attention_kernel[(rows, n_split)](
        q, k_cache, v_cache, idx, k_b if k_b is not None else idx, m, l, acc,
        k, rows // b, 1 if p.group else p.group_size, heads_per_row, tiles, n_split, scaling * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_KB=k_b is not None, HEAD_DIM=dh, BLOCK_G=max(_MIN_DOT, triton.next_power_of_2(heads_per_row)), BLOCK_D=block_d,
        BLOCK_N=cfg.block_n_attn, **_launch(cfg, q),
    )
    _merge_splits_kernel[(b * hq,)](
        m, l, acc, out, n_split, heads_per_row, hq, out.stride(0), out.stride(1),
        HEAD_DIM=dh, BLOCK_S=triton.next_power_of_2(n_split), BLOCK_D=block_d, num_warps=4,
    )
    return out


def loki_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    d: int | tuple[int, ...] | torch.Tensor,
    k_frac: float,
    scaling: float,
    kv_start: torch.Tensor | None = None,
    gqa_select: str = "group",
    config: LokiKernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loki decode step with the Triton kernels (bf16/fp16/fp32; CUDA, or CPU under TRITON_INTERPRET=1).
    Same arguments and result as `loki_decode_attention`; `config` overrides the launch settings; `out`
    ([B, Hq, D] in q.dtype, last dim contiguous) receives the result when given."""
    p = _check(q, k_cache, v_cache, d, k_frac, kv_start, gqa_select)
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton path takes {_TRITON_DTYPES}, got {q.dtype}: use loki_decode_attention_torch")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with stride(-1) == 1")
    k, k_b = _budget(p, kv_start)
    if k == 0:
        return out.zero_()
    cfg = config or LokiKernelConfig()
    scores = triton_scores(p, q, k_cache, kv_start, cfg)
    idx = select_tokens(scores, k, k_b, scores.shape[0] // p.batch, cfg)
    return triton_attend(p, q, k_cache, v_cache, idx, k_b, scaling, cfg, out)


def loki_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    d: int | tuple[int, ...] | torch.Tensor,
    k_frac: float,
    scaling: float,
    kv_start: torch.Tensor | None = None,
    gqa_select: str = "group",
) -> torch.Tensor:
    """One Loki decode step: sparse attention of `q` over the top `k_frac` of the cached tokens.

    q: [B, Hq, D] rotated into the PCA basis of its KV head; k_cache, v_cache: [B, Hkv, S, D] (keys rotated; any
    strides with stride(-1) == 1, e.g. [:, :, :S] of a preallocated cache); d: dims of the approximate scores,
    an int, or one per KV head (tuple of ints or int tensor [Hkv]; a tensor on the GPU costs a host sync);
    k_frac in (0, 1]; scaling: softmax scale;
    kv_start: int [B] first valid key of each sequence (left padding) or None; gqa_select: "group" (one top-k per
    KV head on the max over its query heads) or "query" (one per query head).
    Returns [B, Hq, D] in q.dtype. CUDA bf16/fp16/fp32 runs the Triton kernels, anything else PyTorch.
    """
    impl = loki_decode_attention_triton if q.is_cuda and q.dtype in _TRITON_DTYPES else loki_decode_attention_torch
    return impl(q, k_cache, v_cache, d=d, k_frac=k_frac, scaling=scaling, kv_start=kv_start, gqa_select=gqa_select)
