"""Decode stage 2: the exact top-k_b of each row of scores, positions in increasing order, ties at the threshold
to the earliest positions (`select_tokens`).

One program per row (`_select_kernel`, for rows up to ``select_kernel_max_seq`` when they are enough to fill the
GPU): a strided sample brackets the k_b-th score, one pass collects the candidates inside the bracket, a radix
select finds the threshold, one pass writes the positions (`select_row`, shared with the fused kernel). Otherwise
three kernels with many programs per row, one chunk of the row each: (1) count the chunk's scores above the
bracket and add a 256-bin histogram of those inside it to the row's; the row's last program finds the bin of the
k_b-th score; (2) count the chunk's scores above that bin and collect the bin's few candidates; the row's last
program finds the exact threshold among them and each chunk's output offset and share of the ties; (3) write
each chunk's positions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_block, num_sms
from .common import order_key, padded_len
from .config import LokiKernelConfig, split_work
from .workspace import DecodeWorkspace

_SUB_BINS = 256  # bins of the bracket histogram of the multi-program selection
# Per-row int32 header of the multi-program selection: threshold, candidate count, tickets of passes 1 and 2,
# the threshold bin's first and last key, the rank of the k_b-th score within that bin, resolved (by pass 1).
# Then per chunk: count above (the bracket, then the bin), output offset, share of the ties.
_META = tl.constexpr(8)


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
    u = order_key(tl.load(s_row + offs_m * sample_stride, mask=offs_m < n_sample, other=float("-inf")))
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
def _load_scores(s_row, offs, n, PADDED: tl.constexpr):
    """Scores at `offs`, -inf at positions >= n. PADDED: the row is readable up to n rounded up to 16 (workspace
    rows are), so the load takes a 16-aligned mask and vectorizes (a mask against n itself, unknown in
    alignment since lengths are not specialised on, splits it into scalar loads)."""
    if PADDED:
        ok = offs < n
        return tl.where(ok, tl.load(s_row + offs, mask=offs < padded_len(n), other=float("-inf")), float("-inf"))
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
        key = order_key(_load_scores(s_row, offs, pos_hi, PADDED))
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
    key = order_key(_load_scores(s_row, offs, seq, PADDED))
    return key, tl.sum((ok & (key > hi)).to(tl.int32)), ok & (key >= lo) & (key <= hi)


@triton.jit
def _all_keys_as_candidates(s_row, ck_row, cp_row, seq, BLOCK: tl.constexpr, WITH_POS: tl.constexpr,
                            PADDED: tl.constexpr):
    """The fallback when the sample misled: every score of the row becomes a candidate, its order key at ck_row
    (and, WITH_POS, its position at cp_row)."""
    for start in range(0, seq, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < seq
        tl.store(ck_row + offs, order_key(_load_scores(s_row, offs, seq, PADDED)), mask=ok)
        if WITH_POS:
            tl.store(cp_row + offs, offs, mask=ok)


@triton.jit
def select_row(s_row, c_row, i_row, seq, kb, sample_stride, n_sample,
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


@triton.jit(do_not_specialize=["seq", "k_sel", "sample_stride", "n_sample"])
def _select_kernel(
    s_ptr, kb_ptr, cand_ptr, idx_ptr,
    seq, s_stride, c_stride, i_stride, k_sel, rows_per_batch, sample_stride, n_sample,
    HAS_KB: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, MARGIN_SIGMAS: tl.constexpr,
    PADDED: tl.constexpr,
):
    """Exact top-k_b of one row of scores per program (`select_row`): its positions in increasing order."""
    row = tl.program_id(0).to(tl.int64)
    kb = (tl.load(kb_ptr + row // rows_per_batch) if HAS_KB else k_sel) + tl.zeros([], dtype=tl.int32)
    if kb > 0:
        select_row(s_ptr + row * s_stride, cand_ptr + row * c_stride, idx_ptr + row * i_stride, seq, kb,
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


def rows_padded(scores: torch.Tensor) -> bool:
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
                  cfg: LokiKernelConfig, workspace: DecodeWorkspace) -> torch.Tensor:
    """Stage 2: int32 [rows, k] positions of the k_b best scores of each row of float32 `scores` [rows, S]
    (stride(-1) == 1; row r belongs to sequence r // rows_per_batch; k_b = k without padding; entries past k_b
    are unused), in increasing order, ties at the threshold to the earliest positions. One program per row or
    several (`one_program_select`). A view of `workspace`, valid until its next call."""
    rows, s = scores.shape
    ws = workspace.on(scores.device)
    padded = rows_padded(scores)
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
    n_chunks, tiles = split_work(s, block, rows, cfg.programs_per_sm * num_sms(scores.device),
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
