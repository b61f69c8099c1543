"""Loki for many query rows at once (mode "all": teacher-forced forwards, perplexity, lm-eval): Triton kernels.

The op takes prepared tensors (`hf_patch.loki.prefill` prepares them from a model's attention call): queries
``q [B, Hq, T, D]`` (rotated into the basis when the keys are), keys and values ``[B, Hkv, S, D]``, the approximate
queries and keys ``qa [B, Hq, T, DP]``, ``ka [B, Hkv, S, DP]`` (the first d dims of the rotated queries and keys,
zeros past d_j for KV head j and up to DP, a power of two >= 16), and the budget ``kb [B, T]``: keys kept by each
query row. Row t of sequence b sees the keys ``start_b <= j < end_b`` with ``j <= t + S - T`` (left or right
padding; ``ranges`` None: plain causal, start 0 and end S); of those it always keeps the first ``sink`` and the last
``recent`` (protected, counted inside kb), and the best approximate scores ``a = qa . ka`` among the others (max
over the G query heads of a KV head with ``group``). Two kernels:

1. `_threshold_kernel` (one program per block of query rows of one selection head): the approximate scores of the
   unprotected visible keys are recomputed tile by tile, never stored; with ``n`` of them and ``kb' = kb - #protected``
   to choose. One pass gives each row its min, max, mean and spread; each further pass counts, per row, the scores
   >= a trial threshold m (and the nearest scores on each side of m), which brackets the kb'-th largest score
   between two actual scores L <= U. Trial thresholds: a normal quantile of the row's scores first, then
   interpolation on the counts (clamped), then, after `max_interp` passes, bisection in float order-key space
   (at most 32 more). A row is done when a trial threshold has exactly kb' scores at or above it, or when L == U
   (a tie at the kb'-th score: one more pass finds the position of the last tied key to keep, earliest positions
   first). Rows with kb' >= n (dense rows) and kb' = 0 are done before any pass; a block of only such rows reads
   no key. Output per row: threshold t and cutoff position p; kept = protected U {a > t} U {a == t and position
   <= p}, kb keys.
2. `_attention_kernel`: causal flash attention (online softmax in float32, exp2) over all D dims that recomputes
   the approximate scores per key tile with the same code and block sizes as stage 1, keeps a key iff it is
   visible and protected or passes the row's (t, p) test, and skips nothing else (a block of dense rows computes
   no approximate score). Rows that see no key give 0.

Stage 1 and stage 2 must compute bit-identical approximate scores: both call `_approx_scores` with the same
block sizes and warps (one `LokiPrefillConfig`), and the same tile plan (`_tile_plan`: fully visible tiles
without protected keys take the unmasked code). `count` output (tests, benchmark) reports how many keys each
row kept in stage 2, which must equal kb.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..launch import dot_block, dot_options
from .common import LOG2E, online_softmax_step, order_key

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256  # larger heads stay on the PyTorch path (one tile of D per row block)


@dataclass(frozen=True)
class LokiPrefillConfig:
    """Launch settings. block_m/block_n/num_warps are shared by both kernels (identical approximate scores)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2  # attention kernel only
    max_interp: int = 24  # passes of interpolation before bisection in order-key space
    max_iter: int = 64  # hard bound on counting passes (reached only with NaN scores)


def default_config(dtype: torch.dtype) -> LokiPrefillConfig:
    """float32 dots run on FMA units (no TF32): smaller tiles keep them in registers (sm_90: no spills)."""
    return LokiPrefillConfig(block_m=32, block_n=32) if dtype == torch.float32 else LokiPrefillConfig()


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _from_key(key):
    """Inverse of `order_key`: int32 order key -> float32."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _approx_scores(
    qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, seq, start, lim,
    G_SEL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Approximate scores [BLOCK_M, BLOCK_N] (float32) of keys n0 ... n0 + BLOCK_N - 1: one dot on the first d
    dims per query head, max over the G_SEL heads (qa = first head, preloaded; the others load from qa_ptrs).
    MASKED: keys outside [start, lim_row] (and past `seq`) get -inf; unmasked tiles must be fully visible."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    ptrs = ka_base + offs_n[:, None] * stride_ks + tl.arange(0, BLOCK_DP)[None, :]
    if MASKED:
        ka = tl.load(ptrs, mask=(offs_n < seq)[:, None], other=0.0)
    else:
        ka = tl.load(ptrs)
    if UPCAST:
        ka = ka.to(tl.float32)
    kt = tl.trans(ka)
    s = tl.dot(qa, kt, input_precision=DOT_PREC)
    for g in tl.static_range(1, G_SEL):
        qg = tl.load(qa_ptrs + g * stride_qh, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            qg = qg.to(tl.float32)
        s = tl.maximum(s, tl.dot(qg, kt, input_precision=DOT_PREC))
    if MASKED:
        vis = (offs_n[None, :] >= start) & (offs_n[None, :] <= lim[:, None])
        s = tl.where(vis, s, float("-inf"))
    return s


@triton.jit
def _tile_plan(start, lim, row_ok, sink, recent, BLOCK_N: tl.constexpr):
    """Key tiles of a row block: the ones every row sees whole with no protected key, [f_lo, f_hi), and the others
    (partly visible, or holding the first `sink` or some row's last `recent` keys), counted as [lo, f_lo)
    followed by [f_hi, hi). Returns (lo, f_lo, f_hi, n_masked)."""
    lim_max = tl.max(lim)
    lim_min = tl.min(tl.where(row_ok, lim, 2147483647))
    lo = start // BLOCK_N
    hi = tl.maximum(lo, tl.cdiv(lim_max + 1, BLOCK_N))
    f_lo = tl.minimum(tl.cdiv(start + sink, BLOCK_N), hi)
    f_hi = tl.maximum(f_lo, tl.minimum(tl.maximum(lim_min + 1 - recent, 0) // BLOCK_N, hi))
    return lo, f_lo, f_hi, (f_lo - lo) + (hi - f_hi)


@triton.jit
def _protected(n0, start, lim, sink, recent, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the protected keys n0 ... n0 + BLOCK_N - 1 of each row: visible (start <= j <=
    lim) and among the first `sink` (j < start + sink) or the last `recent` (j > lim - recent)."""
    offs_n = (n0 + tl.arange(0, BLOCK_N))[None, :]
    vis = (offs_n >= start) & (offs_n <= lim[:, None])
    return vis & ((offs_n < start + sink) | (offs_n > lim[:, None] - recent))


@triton.jit
def _search_scores(
    qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, seq, start, lim, sink, recent,
    G_SEL: tl.constexpr, MASKED: tl.constexpr, PROTECT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """The scores stage 1 searches: `_approx_scores`, and -inf at protected keys (only masked tiles hold any)."""
    s = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, seq, start, lim,
                       G_SEL, MASKED, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
    if MASKED and PROTECT:
        s = tl.where(_protected(n0, start, lim, sink, recent, BLOCK_N), float("-inf"), s)
    return s


@triton.jit
def _masked_tile(i, lo, f_lo, f_hi):
    """Index of the i-th partly visible tile."""
    return tl.where(i < f_lo - lo, lo + i, f_hi + i - (f_lo - lo))


@triton.jit
def _stats_update(s, mn, mx, sm, sq, MASKED: tl.constexpr):
    """Running min, max, sum and sum of squares of the visible scores of each row."""
    if MASKED:
        vis = s > float("-inf")
        mn = tl.minimum(mn, tl.min(tl.where(vis, s, float("inf")), axis=1))
        s0 = tl.where(vis, s, 0.0)
    else:
        mn = tl.minimum(mn, tl.min(s, axis=1))
        s0 = s
    mx = tl.maximum(mx, tl.max(s, axis=1))
    return mn, mx, sm + tl.sum(s0, axis=1), sq + tl.sum(s0 * s0, axis=1)


@triton.jit
def _count_update(s, m, c, a, z):
    """Per row: c += #(s >= m); a = min of those scores; z = max of the visible scores below m."""
    ge = s >= m[:, None]
    c += tl.sum(ge.to(tl.int32), axis=1)
    a = tl.minimum(a, tl.min(tl.where(ge, s, float("inf")), axis=1))
    z = tl.maximum(z, tl.max(tl.where(ge, float("-inf"), s), axis=1))
    return c, a, z


@triton.jit
def _normal_quantile(p):
    """z with P(N(0,1) <= z) = p, p in (0, 1) (Abramowitz & Stegun 26.2.23, |error| < 4.5e-4)."""
    pp = tl.minimum(p, 1.0 - p)
    t = tl.sqrt(-2.0 * tl.log(pp))
    num = 2.515517 + 0.802853 * t + 0.010328 * t * t
    z = t - num / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
    return tl.where(p > 0.5, z, -z)


@triton.jit
def _trial_threshold(it, L, U, cL, cU, kb, n, mean, sd, MAX_INTERP: tl.constexpr):
    """Next trial threshold m with L < m <= U (rows with L < U)."""
    kbf = kb.to(tl.float32)
    if it == 0:  # the row's scores as a normal sample: the quantile that leaves k_b + 1/2 above
        frac_above = (kbf + 0.5) / tl.maximum(n, 1).to(tl.float32)
        m = mean + sd * _normal_quantile(tl.minimum(tl.maximum(1.0 - frac_above, 1e-6), 1.0 - 1e-6))
    elif it < MAX_INTERP:  # scores spread evenly between L and U: aim at k_b + 1/2 scores >= m
        f = (cL - kb).to(tl.float32) - 0.5
        f = f / tl.maximum(cL - cU, 1).to(tl.float32)
        f = tl.minimum(tl.maximum(f, 1.0 / 64), 63.0 / 64)
        m = L + (U - L) * f
    else:  # bisection on the order keys: at most 32 passes
        mid = (order_key(L).to(tl.int64) + order_key(U).to(tl.int64) + 1) >> 1
        m = _from_key(mid.to(tl.int32))
    next_up = _from_key(order_key(tl.where(L == 0.0, 0.0, L)) + 1)  # smallest float above L (+0 for -0)
    return tl.minimum(tl.maximum(m, next_up), U)


@triton.jit
def _row_stats(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, S, start, lim, sink, recent, n, lo, f_lo, f_hi,
               n_masked, G_SEL: tl.constexpr, PROTECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One pass over a row block's keys: (min, max, mean, spread) [BLOCK_M] of each row's n searched scores."""
    mn = tl.full([BLOCK_M], float("inf"), tl.float32)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sm = tl.zeros([BLOCK_M], tl.float32)
    sq = tl.zeros([BLOCK_M], tl.float32)
    for tile in range(f_lo, f_hi):
        s = _search_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, tile * BLOCK_N, S, start, lim, sink,
                           recent, G_SEL, False, PROTECT, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        mn, mx, sm, sq = _stats_update(s, mn, mx, sm, sq, False)
    for i in range(n_masked):
        n0 = _masked_tile(i, lo, f_lo, f_hi) * BLOCK_N
        s = _search_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, S, start, lim, sink, recent,
                           G_SEL, True, PROTECT, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        mn, mx, sm, sq = _stats_update(s, mn, mx, sm, sq, True)
    nf = tl.maximum(n, 1).to(tl.float32)
    mean = sm / nf
    return mn, mx, mean, tl.sqrt(tl.maximum(sq / nf - mean * mean, 0.0))


@triton.jit(do_not_specialize=["T", "S", "off", "sink", "recent"])  # lengths vary per batch: no recompiles
def _threshold_kernel(
    qa_ptr, ka_ptr, kb_ptr, start_ptr, end_ptr, thr_ptr, pos_ptr, passes_ptr,
    T, S, off, sel_heads, kv_div, sink, recent,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
    G_SEL: tl.constexpr, HAS_RANGE: tl.constexpr, PROTECT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr, MAX_INTERP: tl.constexpr, MAX_ITER: tl.constexpr,
    PASSES: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Stage 1: per query row of one selection head (query head, or KV head on the group max), the threshold t
    and tie cutoff p of its kb' best unprotected visible keys (t = -inf: all of them; t = +inf: none). Writes
    float32 t and int32 p at [b, head, row]; PASSES: the number of passes over the keys of this program
    (statistics + counting + tie) at [b * head, row block]."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b = pid_bh // sel_heads
    h = pid_bh % sel_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    start = tl.load(start_ptr + b) if HAS_RANGE else 0
    end = tl.load(end_ptr + b) if HAS_RANGE else S
    lim = tl.where(row_ok, tl.minimum(offs_m + off, end - 1), -1)  # last visible key of each row
    n = tl.maximum(lim - start + 1, 0)  # visible keys
    kb = tl.load(kb_ptr + b * T + offs_m, mask=row_ok, other=0)
    if PROTECT:  # the searched keys exclude the protected ones, which the budget counts
        n_prot = tl.minimum(n, sink + recent)
        n -= n_prot
        kb = tl.maximum(kb - n_prot, 0)
    none = kb <= 0
    every = (kb >= n) & ~none
    qa_ptrs = (qa_ptr + b.to(tl.int64) * stride_qb + h * G_SEL * stride_qh + offs_m[:, None] * stride_qt
               + tl.arange(0, BLOCK_DP)[None, :])
    qa = tl.load(qa_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        qa = qa.to(tl.float32)
    ka_base = ka_ptr + b.to(tl.int64) * stride_kb + (h // kv_div) * stride_kh
    lo, f_lo, f_hi, n_masked = _tile_plan(start, lim, row_ok, sink, recent, BLOCK_N)

    # pass 0 (skipped by blocks of dense or empty rows): min, max, mean, spread
    mn = tl.zeros([BLOCK_M], tl.float32)
    mx = tl.zeros([BLOCK_M], tl.float32)
    mean = tl.zeros([BLOCK_M], tl.float32)
    sd = tl.zeros([BLOCK_M], tl.float32)
    it = tl.zeros([], tl.int32) - 1
    if tl.min((none | every).to(tl.int32)) == 0:
        mn, mx, mean, sd = _row_stats(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, S, start, lim, sink, recent,
                                      n, lo, f_lo, f_hi, n_masked, G_SEL, PROTECT, BLOCK_M, BLOCK_N, BLOCK_DP,
                                      DOT_PREC, UPCAST)
        it += 1

    # Invariants: count(>= L) = cL >= kb; count(> U) = cU < kb; L and U are scores of the row.
    L = tl.where(n > 0, mn, 0.0)  # finite on rows that search nothing (they are done from the start)
    U = tl.where(n > 0, mx, 0.0)
    cL = n
    cU = tl.zeros([BLOCK_M], tl.int32)
    tie = ~none & ~every & (L == U)
    thr = tl.where(none, float("inf"), tl.where(every, float("-inf"), L))
    pos = tl.where(none, -1, 2147483647)  # no cutoff: every key equal to t is kept
    done = none | every | tie
    n_iter = tl.zeros([], tl.int32)
    while (tl.min(done.to(tl.int32)) == 0) & (n_iter < MAX_ITER):
        m = _trial_threshold(n_iter, L, U, cL, cU, kb, n, mean, sd, MAX_INTERP)
        c = tl.zeros([BLOCK_M], tl.int32)
        a = tl.full([BLOCK_M], float("inf"), tl.float32)
        z = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for tile in range(f_lo, f_hi):
            s = _search_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, tile * BLOCK_N, S, start, lim,
                               sink, recent, G_SEL, False, PROTECT, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
            c, a, z = _count_update(s, m, c, a, z)
        for i in range(n_masked):
            s = _search_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks,
                               _masked_tile(i, lo, f_lo, f_hi) * BLOCK_N, S, start, lim, sink, recent,
                               G_SEL, True, PROTECT, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
            c, a, z = _count_update(s, m, c, a, z)
        hit = ~done & (c == kb)  # exactly kb scores >= m: keep those
        thr = tl.where(hit, m, thr)
        done = done | hit
        up = ~done & (c > kb)
        L = tl.where(up, a, L)
        cL = tl.where(up, c, cL)
        dn = ~done & (c < kb)
        U = tl.where(dn, z, U)
        cU = tl.where(dn, c, cU)
        new_tie = ~done & (L == U)  # the kb-th score is L, shared by more than the keys still needed
        thr = tl.where(new_tie, L, thr)
        tie = tie | new_tie
        done = done | new_tie
        n_iter += 1
    thr = tl.where(done, thr, L)  # iteration bound hit (NaN scores): keep the cL >= kb scores >= L
    it += n_iter

    if tl.max(tie.to(tl.int32)) > 0:  # the cutoff position of the (kb - cU)-th key equal to t, in key order
        need = kb - cU
        seen = tl.zeros([BLOCK_M], tl.int32)
        cut = tl.full([BLOCK_M], -1, tl.int32)
        for tile in range(lo, lo + n_masked + (f_hi - f_lo)):
            s = _search_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, tile * BLOCK_N, S, start, lim,
                               sink, recent, G_SEL, True, PROTECT, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
            eq = (s == thr[:, None]).to(tl.int32)
            hit = (eq > 0) & ((seen[:, None] + tl.cumsum(eq, axis=1)) == need[:, None])
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            cut = tl.maximum(cut, tl.max(tl.where(hit, offs_n[None, :], -1), axis=1))
            seen += tl.sum(eq, axis=1)
        pos = tl.where(tie, cut, pos)
        it += 1

    out = (pid_bh * T + offs_m).to(tl.int64)
    tl.store(thr_ptr + out, thr, mask=row_ok)
    tl.store(pos_ptr + out, pos, mask=row_ok)
    if PASSES:
        tl.store(passes_ptr + pid_bh * tl.num_programs(0) + pid_m, it + 1)


@triton.jit
def _keep_mask(
    qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, seq, start, lim, sink, recent, thr, pos, dense,
    G_SEL: tl.constexpr, MASKED: tl.constexpr, PROTECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] keys kept among n0 ... n0 + BLOCK_N - 1: visible, and protected or passing the row's
    (t, p) test on the recomputed approximate scores. `dense` (every row of the block keeps all it sees): the
    visible keys, no score computed."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if dense:
        keep = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    else:
        a = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, seq, start, lim,
                           G_SEL, MASKED, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        keep = (a > thr[:, None]) | ((a == thr[:, None]) & (offs_n[None, :] <= pos[:, None]))
        if MASKED and PROTECT:
            keep = keep | _protected(n0, start, lim, sink, recent, BLOCK_N)
    if MASKED:
        keep = keep & (offs_n[None, :] >= start) & (offs_n[None, :] <= lim[:, None])
    return keep


@triton.jit
def _attend_tile(
    acc, m_i, l_i, cnt, q, keep, k_base, stride_ks, v_base, stride_vs, n0, seq, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key tile of stage 2: exact online softmax over the `keep` [BLOCK_M, BLOCK_N] keys of the tile."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = offs_d[None, :] < HEAD_DIM
    if MASKED:
        kv_mask = kv_mask & (offs_n < seq)[:, None]
    keys = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        keys = keys.to(tl.float32)
    s = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC) * qk_scale
    vals = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, tl.where(keep, s, float("-inf")), vals, DOT_PREC, UPCAST)
    return acc, m_i, l_i, cnt + tl.sum(keep.to(tl.int32), axis=1)


@triton.jit(do_not_specialize=["T", "S", "off", "sink", "recent"])  # lengths vary per batch: no recompiles
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, qa_ptr, ka_ptr, thr_ptr, pos_ptr, start_ptr, end_ptr, out_ptr, cnt_ptr,
    T, S, off, q_heads, group_size, sel_div, qk_scale, sink, recent,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ab, stride_ah, stride_at, stride_xb, stride_xh, stride_xs, stride_ob, stride_ot, stride_oh,
    G_SEL: tl.constexpr, HAS_RANGE: tl.constexpr, PROTECT: tl.constexpr, COUNT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Stage 2: causal attention of BLOCK_M query rows of one query head over their kept keys -> out [B, T, Hq, D]."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    j = h // group_size
    hs = h // sel_div  # selection head: h ("query") or j ("group")
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    start = tl.load(start_ptr + b) if HAS_RANGE else 0
    end = tl.load(end_ptr + b) if HAS_RANGE else S
    lim = tl.where(row_ok, tl.minimum(offs_m + off, end - 1), -1)
    sel = ((b * (q_heads // sel_div) + hs) * T + offs_m).to(tl.int64)
    thr = tl.load(thr_ptr + sel, mask=row_ok, other=float("-inf"))
    pos = tl.load(pos_ptr + sel, mask=row_ok, other=-1)
    dense = tl.max(thr) == float("-inf")  # every row keeps every key it sees
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    qa_ptrs = (qa_ptr + b64 * stride_ab + hs * G_SEL * stride_ah + offs_m[:, None] * stride_at
               + tl.arange(0, BLOCK_DP)[None, :])
    qa = tl.load(qa_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q, qa = q.to(tl.float32), qa.to(tl.float32)
    ka_base = ka_ptr + b64 * stride_xb + j * stride_xh
    k_base = k_ptr + b64 * stride_kb + j * stride_kh
    v_base = v_ptr + b64 * stride_vb + j * stride_vh
    lo, f_lo, f_hi, n_masked = _tile_plan(start, lim, row_ok, sink, recent, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    for tile in range(f_lo, f_hi):
        keep = _keep_mask(qa, qa_ptrs, row_ok, stride_ah, ka_base, stride_xs, tile * BLOCK_N, S, start, lim, sink,
                          recent, thr, pos, dense, G_SEL, False, PROTECT, BLOCK_M, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        acc, m_i, l_i, cnt = _attend_tile(acc, m_i, l_i, cnt, q, keep, k_base, stride_ks, v_base, stride_vs,
                                          tile * BLOCK_N, S, qk_scale, False, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PREC,
                                          UPCAST)
    for i in range(n_masked):
        n0 = _masked_tile(i, lo, f_lo, f_hi) * BLOCK_N
        keep = _keep_mask(qa, qa_ptrs, row_ok, stride_ah, ka_base, stride_xs, n0, S, start, lim, sink, recent, thr,
                          pos, dense, G_SEL, True, PROTECT, BLOCK_M, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        acc, m_i, l_i, cnt = _attend_tile(acc, m_i, l_i, cnt, q, keep, k_base, stride_ks, v_base, stride_vs, n0, S,
                                          qk_scale, True, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PREC, UPCAST)
    res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0: nothing kept, acc = 0
    o_ptrs = out_ptr + b64 * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if COUNT:
        tl.store(cnt_ptr + (pid_bh * T + offs_m).to(tl.int64), cnt, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


Ranges = tuple[torch.Tensor, torch.Tensor] | None  # (start, end) int32 [B] of the keys each sequence sees


def approx_width(d_max: int) -> int:
    """DP, the last dim of qa and ka for approximate scores over at most d_max dims: a power of two >= 16."""
    return dot_block(d_max)


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: torch.Tensor, ka: torch.Tensor) -> None:
    """q [B, Hq, T, D], k and v [B, Hkv, S, D] (S >= T), qa [B, Hq, T, DP], ka [B, Hkv, S, DP]: one dtype of
    TRITON_DTYPES, one device, D <= MAX_HEAD_DIM, DP = approx_width(d), last dims contiguous."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, Hq, T, D], k and v [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hq, t, dh = q.shape
    _, hkv, s, _ = k.shape
    if k.shape[0] != b or k.shape[-1] != dh or hkv == 0 or hq % hkv or s < t:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: same B and D, Hq a multiple of Hkv, "
                         "S >= T (the T rows are the last T positions)")
    dp = qa.shape[-1] if qa.dim() == 4 else -1
    if qa.shape[:3] != q.shape[:3] or ka.shape[:3] != k.shape[:3] or ka.shape[-1] != dp or dp != dot_block(dp):
        raise ValueError(f"qa must be [B, Hq, T, DP] and ka [B, Hkv, S, DP] with DP = approx_width(d) (a power of "
                         f"two >= 16); got {tuple(qa.shape)} and {tuple(ka.shape)}")
    tensors = (q, k, v, qa, ka)
    if len({x.dtype for x in tensors}) != 1 or q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q, k, v, qa and ka must share one dtype of {TRITON_DTYPES}, got "
                        f"{[x.dtype for x in tensors]}: use loki_prefill_attention_torch")
    if len({x.device for x in tensors}) != 1:
        raise ValueError("q, k, v, qa and ka must be on one device")
    if dh > MAX_HEAD_DIM:
        raise ValueError(f"head dim {dh} > {MAX_HEAD_DIM}: use loki_prefill_attention_torch")
    if any(x.stride(-1) != 1 for x in tensors):
        raise ValueError("q, k, v, qa and ka need a contiguous last dim (stride(-1) == 1)")


def _int32_on(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int32/int64 tensor of `shape` on `device` as a contiguous int32 tensor."""
    if not isinstance(x, torch.Tensor) or x.shape != shape or x.dtype not in (torch.int32, torch.int64):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an int32/int64 tensor {list(shape)}, got {got}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, q on {device}: move it to q's device")
    return x.to(torch.int32).contiguous()


def _check_budget(q: torch.Tensor, kb: torch.Tensor, ranges: Ranges, sink: int,
                  recent: int) -> tuple[torch.Tensor, Ranges]:
    """kb [B, T] and ranges as contiguous int32; sink and recent ints >= 0 (kb's values are the caller's)."""
    b, _, t, _ = q.shape
    for name, value in (("sink", sink), ("recent", recent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (keys always kept), got {value!r}")
    kb = _int32_on("kb", kb, (b, t), q.device)
    if ranges is None:
        return kb, None
    if not isinstance(ranges, (tuple, list)) or len(ranges) != 2:
        raise ValueError(f"ranges must be (start, end), int tensors [B], or None (plain causal); got {ranges!r}")
    return kb, tuple(_int32_on(name, x, (b,), q.device) for name, x in zip(("ranges[0]", "ranges[1]"), ranges))


def _launch_opts(cfg: LokiPrefillConfig, x: torch.Tensor) -> dict:
    return dict(num_warps=cfg.num_warps, **dot_options(x))


def prefill_thresholds(qa: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor, ranges: Ranges, group: bool,
                       sink: int, recent: int, cfg: LokiPrefillConfig,
                       passes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1. qa [B, Hq, T, DP], ka [B, Hkv, S, DP] (zero past d), kb int32 [B, T] (contiguous), ranges int32.
    Returns (t float32, p int32), each [B, H_sel, T] (H_sel = Hkv for group selection, else Hq); `passes`
    (int32 [B * H_sel, row blocks]) receives each program's number of passes over its keys."""
    b, hq, t, dp = qa.shape
    hkv, s = ka.shape[1], ka.shape[2]
    g = hq // hkv
    sel = hkv if group else hq
    thr = torch.empty((b, sel, t), device=qa.device, dtype=torch.float32)
    pos = torch.empty((b, sel, t), device=qa.device, dtype=torch.int32)
    start, end = ranges if ranges is not None else (kb, kb)
    _threshold_kernel[(triton.cdiv(t, cfg.block_m), b * sel)](
        qa, ka, kb, start, end, thr, pos, passes if passes is not None else pos,
        t, s, s - t, sel, 1 if group else g, sink, recent,
        qa.stride(0), qa.stride(1), qa.stride(2), ka.stride(0), ka.stride(1), ka.stride(2),
        G_SEL=g if group else 1, HAS_RANGE=ranges is not None, PROTECT=sink > 0 or recent > 0, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_DP=dp, MAX_INTERP=cfg.max_interp, MAX_ITER=cfg.max_iter,
        PASSES=passes is not None, **_launch_opts(cfg, qa),
    )
    return thr, pos


def prefill_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: torch.Tensor, ka: torch.Tensor,
                   thr: torch.Tensor, pos: torch.Tensor, ranges: Ranges, sink: int, recent: int, scaling: float,
                   cfg: LokiPrefillConfig, out: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2 into out [B, T, Hq, D] (last dim contiguous); `count` int32 [B, Hq, T] receives kept keys per row."""
    b, hq, t, dh = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    group = thr.shape[1] != hq
    sel_div = hq // thr.shape[1]
    start, end = ranges if ranges is not None else (pos, pos)
    _attention_kernel[(triton.cdiv(t, cfg.block_m), b * hq)](
        q, k, v, qa, ka, thr, pos, start, end, out, count if count is not None else pos,
        t, s, s - t, hq, g, sel_div, scaling * LOG2E, sink, recent,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qa.stride(0), qa.stride(1), qa.stride(2),
        ka.stride(0), ka.stride(1), ka.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G_SEL=g if group else 1, HAS_RANGE=ranges is not None, PROTECT=sink > 0 or recent > 0,
        COUNT=count is not None, HEAD_DIM=dh, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=dot_block(dh),
        BLOCK_DP=qa.shape[-1], num_stages=cfg.num_stages, **_launch_opts(cfg, q),
    )
    return out


def loki_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qa: torch.Tensor,
    ka: torch.Tensor,
    kb: torch.Tensor,
    ranges: Ranges,
    *,
    group: bool,
    scaling: float,
    sink: int = 0,
    recent: int = 0,
    config: LokiPrefillConfig | None = None,
    out: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loki on every query row with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) -> [B, T, Hq, D].

    q: [B, Hq, T, D] queries (rotated into the basis iff the keys are); k, v: [B, Hkv, S, D], S >= T (row t is
    position t + S - T); qa: [B, Hq, T, DP] and ka: [B, Hkv, S, DP] approximate queries and keys, zero past each KV
    head's d and up to DP = approx_width(max d) (with qa of the query heads of KV head j zero past d_j, ka may hold
    more dims); one dtype of TRITON_DTYPES, D <= MAX_HEAD_DIM, last dims contiguous.
    kb: int [B, T] keys kept by each row, 0 <= kb <= n (n: the keys the row sees; kb = n: a dense row, cheap);
    ranges: (start, end) int [B], row t of sequence b sees keys start_b <= j < end_b with j <= t + S - T, or None
    (plain causal: start 0, end S); group: one selection per KV head on the max of the approximate scores over
    its query heads (else one per query head); scaling: softmax scale; sink, recent: every row keeps its first
    `sink` visible keys [start_b, start_b + sink) and its last `recent` [hi - recent, hi) with hi = min(end_b,
    t + S - T + 1), whatever their scores, counted inside kb (kb >= min(n, sink + recent) is the caller's to keep).
    The other kept keys are the best approximate scores, ties to the earliest positions.
    config: launch settings (default `default_config(q.dtype)`); out: [B, T, Hq, D] in q.dtype, last dim contiguous;
    count: int32 [B, Hq, T] receives the keys each row kept (= kb; tests and benchmarks).
    """
    _check_tensors(q, k, v, qa, ka)
    kb, ranges = _check_budget(q, kb, ranges, sink, recent)
    b, hq, t, dh = q.shape
    if out is None:
        out = torch.empty((b, t, hq, dh), device=q.device, dtype=q.dtype)
    elif out.shape != (b, t, hq, dh) or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a [B, T, Hq, D] = {[b, t, hq, dh]} {q.dtype} tensor on {q.device} with "
                         "stride(-1) == 1")
    if count is not None and (count.shape != (b, hq, t) or count.dtype != torch.int32 or not count.is_contiguous()):
        raise ValueError(f"count must be a contiguous int32 tensor [B, Hq, T] = {[b, hq, t]}")
    if t == 0:
        return out
    cfg = config or default_config(q.dtype)
    thr, pos = prefill_thresholds(qa, ka, kb, ranges, group, sink, recent, cfg)
    return prefill_attend(q, k, v, qa, ka, thr, pos, ranges, sink, recent, scaling, cfg, out, count)
