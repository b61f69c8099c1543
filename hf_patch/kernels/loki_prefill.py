"""Loki for many query rows at once (mode "all": teacher-forced forwards, perplexity, lm-eval): Triton kernels.

Computes what `hf_patch.loki.attention.loki_attention_dense` computes (the PyTorch reference), for causal
attention whose visible keys are, per sequence b, the positions ``start_b <= j < end_b`` up to the causal limit
``j <= t + S - T`` (left or right padding; anything else stays on the PyTorch path). Two kernels:

1. `_threshold_kernel` (one program per block of query rows of one selection head): the approximate scores
   ``a = q~[:d_j] . k~[:, :d_j]`` (a small ``tl.dot`` on the first d dims, zero-padded to a power of two >= 16;
   max over the G query heads with ``gqa_select="group"``) are recomputed tile by tile, never stored. One pass
   gives each row its min, max, mean and spread; each further pass counts, per row, the visible scores >= a trial
   threshold m (and the nearest scores on each side of m), which brackets the k_b-th largest score between two
   actual scores L <= U. Trial thresholds: a normal quantile of the row's scores first, then interpolation on the
   counts (clamped), then, after `max_interp` passes, bisection in float order-key space (at most 32 more).
   A row is done when a trial threshold has exactly k_b scores at or above it, or when L == U (a tie at the
   k_b-th score: one more pass finds the position of the last tied key to keep, earliest positions first).
   Output per row: threshold t and cutoff position p; kept = {a > t} U {a == t and position <= p}, k_b keys.
2. `_attention_kernel`: causal flash attention (online softmax in float32, exp2) over all D dims that recomputes
   the approximate scores per key tile with the same code and block sizes as stage 1, keeps a key iff it is
   visible and passes the row's (t, p) test, and skips nothing else. Rows that see no key give 0.

Stage 1 and stage 2 must compute bit-identical approximate scores: both call `_approx_scores` with the same
block sizes and warps (one `LokiPrefillConfig`). `count` output (tests, benchmark) reports how many keys each
row kept in stage 2, which must equal k_b.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..loki.budget import num_tokens
from .launch import dot_block, dot_options
from .loki_decode import _order_key, online_softmax_step

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634


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
# Which keys each row sees: causal + one contiguous [start_b, end_b) range per sequence, or not expressible
# ---------------------------------------------------------------------------------------------------------------

_last_ranges: list = [None, None, None]  # (mask, (q_len, kv_len, batch), result): every layer shares one mask


def key_ranges(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int):
    """(start, end) int32 [B] such that row t sees keys start_b <= j < end_b with j <= t + kv_len - q_len; None
    for plain causal (mask None); False when the visible mask has another form (sliding window, holes, ...).
    The first call per mask compares the whole mask on the device (one host sync); later calls with the same
    mask object (the other layers of the forward) reuse the answer."""
    if attention_mask is None:
        return None
    from ..loki.attention import visible_keys

    shape = (q_len, kv_len, batch)
    if _last_ranges[0] is attention_mask and _last_ranges[1] == shape:
        return _last_ranges[2]
    vis = visible_keys(attention_mask, q_len, kv_len, attention_mask.device)
    result = False
    if vis.dim() == 4 and vis.shape[1] == 1 and vis.shape[0] in (1, batch) and vis.shape[2:] == (q_len, kv_len):
        last = vis[:, 0, -1]  # [B', S]: the last row sees every key of its range
        n = last.sum(-1)
        start = torch.where(n > 0, last.to(torch.int8).argmax(-1), 0)
        end = start + n
        pos = torch.arange(kv_len, device=vis.device)
        rows = torch.arange(q_len, device=vis.device)[:, None] + (kv_len - q_len)
        expect = (pos >= start[:, None, None]) & (pos < end[:, None, None]) & (pos <= rows)  # [B', T, S]
        if torch.equal(vis[:, 0], expect):
            result = tuple(x.to(torch.int32).expand(batch).contiguous() for x in (start, end))
    _last_ranges[:] = [attention_mask, shape, result]
    return result


_last_budgets: list = [None, None, None]  # (ranges, (sizes, k_frac, device), result): shared by the layers


def row_budgets(ranges, batch: int, q_len: int, kv_len: int, k_frac: float, device: torch.device) -> torch.Tensor:
    """k_b of every query row: int32 [B, T] (`num_tokens` of the keys the row sees); the last answer is reused
    for the same `ranges` object and sizes (the other layers of a forward)."""
    key = (batch, q_len, kv_len, k_frac, str(device))
    if _last_budgets[0] is ranges and _last_budgets[1] == key:
        return _last_budgets[2]
    last = torch.arange(q_len, device=device)[None, :] + (kv_len - q_len)  # [1, T]
    if ranges is None:
        n = (last + 1).expand(batch, q_len)
    else:
        start, end = (x.to(torch.int64)[:, None] for x in ranges)
        n = (torch.minimum(last, end - 1) - start + 1).clamp_min(0)
    result = num_tokens(n, k_frac).to(torch.int32).contiguous()
    _last_budgets[:] = [ranges, key, result]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _from_key(key):
    """Inverse of `_order_key`: int32 order key -> float32."""
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
def _tile_plan(start, lim, row_ok, BLOCK_N: tl.constexpr):
    """Key tiles of a row block: fully visible ones [f_lo, f_hi) and the partly visible ones, counted as
    [lo, f_lo) followed by [f_hi, hi). Returns (lo, f_lo, f_hi, n_masked)."""
    lim_max = tl.max(lim)
    lim_min = tl.min(tl.where(row_ok, lim, 2147483647))
    lo = start // BLOCK_N
    hi = tl.maximum(lo, tl.cdiv(lim_max + 1, BLOCK_N))
    f_lo = tl.minimum(tl.cdiv(start, BLOCK_N), hi)
    f_hi = tl.maximum(f_lo, tl.minimum((lim_min + 1) // BLOCK_N, hi))
    return lo, f_lo, f_hi, (f_lo - lo) + (hi - f_hi)


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
        mid = (_order_key(L).to(tl.int64) + _order_key(U).to(tl.int64) + 1) >> 1
        m = _from_key(mid.to(tl.int32))
    next_up = _from_key(_order_key(tl.where(L == 0.0, 0.0, L)) + 1)  # smallest float above L (+0 for -0)
    return tl.minimum(tl.maximum(m, next_up), U)


@triton.jit(do_not_specialize=["T", "S", "off"])  # lengths vary per batch: no recompiles
def _threshold_kernel(
    qa_ptr, ka_ptr, kb_ptr, start_ptr, end_ptr, thr_ptr, pos_ptr, passes_ptr,
    T, S, off, sel_heads, kv_div,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
    G_SEL: tl.constexpr, HAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DP: tl.constexpr, MAX_INTERP: tl.constexpr, MAX_ITER: tl.constexpr, PASSES: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Stage 1: per query row of one selection head (query head, or KV head on the group max), the threshold t
    and tie cutoff p of its k_b best visible keys. Writes float32 t and int32 p at [b, head, row]; PASSES: the
    number of passes over the keys of this program (statistics + counting + tie) at [b * head, row block]."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b = pid_bh // sel_heads
    h = pid_bh % sel_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    start = tl.load(start_ptr + b) if HAS_RANGE else 0
    end = tl.load(end_ptr + b) if HAS_RANGE else S
    lim = tl.where(row_ok, tl.minimum(offs_m + off, end - 1), -1)  # last visible key of each row
    n = tl.maximum(lim - start + 1, 0)
    kb = tl.load(kb_ptr + b * T + offs_m, mask=row_ok, other=0)
    qa_ptrs = (qa_ptr + b.to(tl.int64) * stride_qb + h * G_SEL * stride_qh + offs_m[:, None] * stride_qt
               + tl.arange(0, BLOCK_DP)[None, :])
    qa = tl.load(qa_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        qa = qa.to(tl.float32)
    ka_base = ka_ptr + b.to(tl.int64) * stride_kb + (h // kv_div) * stride_kh
    lo, f_lo, f_hi, n_masked = _tile_plan(start, lim, row_ok, BLOCK_N)

    # pass 0: min, max, mean, spread
    mn = tl.full([BLOCK_M], float("inf"), tl.float32)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sm = tl.zeros([BLOCK_M], tl.float32)
    sq = tl.zeros([BLOCK_M], tl.float32)
    for tile in range(f_lo, f_hi):
        s = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, tile * BLOCK_N, S, start, lim,
                           G_SEL, False, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        mn, mx, sm, sq = _stats_update(s, mn, mx, sm, sq, False)
    for i in range(n_masked):
        s = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks,
                           _masked_tile(i, lo, f_lo, f_hi) * BLOCK_N, S, start, lim,
                           G_SEL, True, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
        mn, mx, sm, sq = _stats_update(s, mn, mx, sm, sq, True)
    nf = tl.maximum(n, 1).to(tl.float32)
    mean = sm / nf
    sd = tl.sqrt(tl.maximum(sq / nf - mean * mean, 0.0))

    # Invariants: count(>= L) = cL >= k_b; count(> U) = cU < k_b; L and U are scores of the row.
    L = tl.where(n > 0, mn, 0.0)  # finite on rows that see nothing (they are done from the start)
    U = tl.where(n > 0, mx, 0.0)
    cL = n
    cU = tl.zeros([BLOCK_M], tl.int32)
    none = kb <= 0
    every = (kb >= n) & ~none
    tie = ~none & ~every & (L == U)
    thr = tl.where(none, float("inf"), L)
    pos = tl.where(none, -1, 2147483647)  # no cutoff: every key equal to t is kept
    done = none | every | tie
    it = tl.zeros([], tl.int32)
    while (tl.min(done.to(tl.int32)) == 0) & (it < MAX_ITER):
        m = _trial_threshold(it, L, U, cL, cU, kb, n, mean, sd, MAX_INTERP)
        c = tl.zeros([BLOCK_M], tl.int32)
        a = tl.full([BLOCK_M], float("inf"), tl.float32)
        z = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for tile in range(f_lo, f_hi):
            s = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, tile * BLOCK_N, S, start, lim,
                               G_SEL, False, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
            c, a, z = _count_update(s, m, c, a, z)
        for i in range(n_masked):
            s = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks,
                               _masked_tile(i, lo, f_lo, f_hi) * BLOCK_N, S, start, lim,
                               G_SEL, True, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
            c, a, z = _count_update(s, m, c, a, z)
        hit = ~done & (c == kb)  # exactly k_b scores >= m: keep those
        thr = tl.where(hit, m, thr)
        done = done | hit
        up = ~done & (c > kb)
        L = tl.where(up, a, L)
        cL = tl.where(up, c, cL)
        dn = ~done & (c < kb)
        U = tl.where(dn, z, U)
        cU = tl.where(dn, c, cU)
        new_tie = ~done & (L == U)  # the k_b-th score is L, shared by more than the keys still needed
        thr = tl.where(new_tie, L, thr)
        tie = tie | new_tie
        done = done | new_tie
        it += 1
    thr = tl.where(done, thr, L)  # iteration bound hit (NaN scores): keep the cL >= k_b scores >= L

    if tl.max(tie.to(tl.int32)) > 0:  # the cutoff position of the (k_b - cU)-th key equal to t, in key order
        need = kb - cU
        seen = tl.zeros([BLOCK_M], tl.int32)
        cut = tl.full([BLOCK_M], -1, tl.int32)
        for tile in range(lo, lo + n_masked + (f_hi - f_lo)):
            s = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, tile * BLOCK_N, S, start, lim,
                               G_SEL, True, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
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
def _attend_tile(
    acc, m_i, l_i, cnt, q, qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, k_base, stride_ks_exact,
    v_base, stride_vs, n0, seq, start, lim, thr, pos, qk_scale,
    G_SEL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key tile of stage 2: select by (t, p) on the recomputed approximate scores, exact online softmax."""
    a = _approx_scores(qa, qa_ptrs, row_ok, stride_qh, ka_base, stride_ks, n0, seq, start, lim,
                       G_SEL, MASKED, BLOCK_N, BLOCK_DP, DOT_PREC, UPCAST)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    keep = (a > thr[:, None]) | ((a == thr[:, None]) & (offs_n[None, :] <= pos[:, None]))
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = offs_d[None, :] < HEAD_DIM
    if MASKED:
        keep = keep & (a > float("-inf"))
        kv_mask = kv_mask & (offs_n < seq)[:, None]
    keys = tl.load(k_base + offs_n[:, None] * stride_ks_exact + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        keys = keys.to(tl.float32)
    s = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC) * qk_scale
    vals = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, tl.where(keep, s, float("-inf")), vals, DOT_PREC, UPCAST)
    return acc, m_i, l_i, cnt + tl.sum(keep.to(tl.int32), axis=1)


@triton.jit(do_not_specialize=["T", "S", "off"])  # lengths vary per batch: no recompiles
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, qa_ptr, ka_ptr, thr_ptr, pos_ptr, start_ptr, end_ptr, out_ptr, cnt_ptr,
    T, S, off, q_heads, group_size, sel_div, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ab, stride_ah, stride_at, stride_xb, stride_xh, stride_xs, stride_ob, stride_ot, stride_oh,
    G_SEL: tl.constexpr, HAS_RANGE: tl.constexpr, COUNT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DP: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
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
    thr = tl.load(thr_ptr + sel, mask=row_ok, other=float("inf"))
    pos = tl.load(pos_ptr + sel, mask=row_ok, other=-1)
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
    lo, f_lo, f_hi, n_masked = _tile_plan(start, lim, row_ok, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    for tile in range(f_lo, f_hi):
        acc, m_i, l_i, cnt = _attend_tile(
            acc, m_i, l_i, cnt, q, qa, qa_ptrs, row_ok, stride_ah, ka_base, stride_xs, k_base, stride_ks,
            v_base, stride_vs, tile * BLOCK_N, S, start, lim, thr, pos, qk_scale,
            G_SEL, False, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_DP, DOT_PREC, UPCAST)
    for i in range(n_masked):
        acc, m_i, l_i, cnt = _attend_tile(
            acc, m_i, l_i, cnt, q, qa, qa_ptrs, row_ok, stride_ah, ka_base, stride_xs, k_base, stride_ks,
            v_base, stride_vs, _masked_tile(i, lo, f_lo, f_hi) * BLOCK_N, S, start, lim, thr, pos, qk_scale,
            G_SEL, True, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_DP, DOT_PREC, UPCAST)
    res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0: nothing kept, acc = 0
    o_ptrs = out_ptr + b64 * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if COUNT:
        tl.store(cnt_ptr + (pid_bh * T + offs_m).to(tl.int64), cnt, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., w] -> contiguous [..., width] with zeros past w."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()


def _launch_opts(cfg: LokiPrefillConfig, x: torch.Tensor) -> dict:
    return dict(num_warps=cfg.num_warps, **dot_options(x))


def prefill_thresholds(qa: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor, ranges, group: bool,
                       cfg: LokiPrefillConfig, passes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1. qa [B, Hq, T, DP], ka [B, Hkv, S, DP] (contiguous, zero past d), kb int32 [B, T].
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
        t, s, s - t, sel, 1 if group else g,
        qa.stride(0), qa.stride(1), qa.stride(2), ka.stride(0), ka.stride(1), ka.stride(2),
        G_SEL=g if group else 1, HAS_RANGE=ranges is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DP=dp, MAX_INTERP=cfg.max_interp, MAX_ITER=cfg.max_iter, PASSES=passes is not None,
        **_launch_opts(cfg, qa),
    )
    return thr, pos


def prefill_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: torch.Tensor, ka: torch.Tensor,
                   thr: torch.Tensor, pos: torch.Tensor, ranges, scaling: float, cfg: LokiPrefillConfig,
                   out: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2 into out [B, T, Hq, D] (last dim contiguous); `count` int32 [B, Hq, T] receives kept keys per row."""
    b, hq, t, dh = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    group = thr.shape[1] != hq
    sel_div = hq // thr.shape[1]
    start, end = ranges if ranges is not None else (pos, pos)
    _attention_kernel[(triton.cdiv(t, cfg.block_m), b * hq)](
        q, k, v, qa, ka, thr, pos, start, end, out, count if count is not None else pos,
        t, s, s - t, hq, g, sel_div, scaling * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qa.stride(0), qa.stride(1), qa.stride(2),
        ka.stride(0), ka.stride(1), ka.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G_SEL=g if group else 1, HAS_RANGE=ranges is not None, COUNT=count is not None, HEAD_DIM=dh,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=dot_block(dh),
        BLOCK_DP=qa.shape[-1], num_stages=cfg.num_stages, **_launch_opts(cfg, q),
    )
    return out


def loki_prefill_attention(loki, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ranges,
                           scaling: float, keys_rotated: bool, config: LokiPrefillConfig | None = None,
                           out: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """Loki on every query row with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    Same inputs and result as `loki_attention_dense` (query [B, H_q, T, D], key/value [B, H_kv, S, D] -> [B, T,
    H_q, D]) except the visible keys, given as `ranges` from `key_ranges` (None: plain causal). The approximate
    query and keys are prepared exactly as there (same tensors, hence the same kept sets).
    """
    cfg = config or default_config(query.dtype)
    b, hq, t, dh = query.shape
    s = key.shape[2]
    if out is None:
        out = torch.empty((b, t, hq, dh), device=query.device, dtype=query.dtype)
    if t == 0:
        return out
    q_rot = loki.rotate_queries(query)  # [B, H_kv, G, T, D]
    d_max = int(loki.dims.max())
    dp = dot_block(d_max)
    qa = _padded(loki.approx_query(q_rot).flatten(1, 2), dp)  # [B, H_q, T, DP]
    ka = _padded(key[..., :d_max] if keys_rotated else loki.rotate_keys(key, d_max), dp)  # [B, H_kv, S, DP]
    q = q_rot.flatten(1, 2) if keys_rotated else query
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    if q.stride(-1) != 1:
        q = q.contiguous()
    kb = row_budgets(ranges, b, t, s, loki.k_frac, query.device)
    thr, pos = prefill_thresholds(qa, ka, kb, ranges, loki.gqa_select == "group", cfg)
    return prefill_attend(q, key, value, qa, ka, thr, pos, ranges, scaling, cfg, out, count)


def loki_prefill_forward(loki, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float,
                         keys_rotated: bool) -> torch.Tensor | None:
    """The kernel path of Loki's attention function: [B, T, H_q, D], or None when it does not apply (dtype, head
    dim, a visible mask that is not causal + one key range per sequence); the caller then runs the PyTorch path."""
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _TRITON_DTYPES or query.shape[-1] > 256:
        return None
    ranges = key_ranges(attention_mask, query.shape[2], key.shape[2], query.shape[0])
    if ranges is False:
        return None
    return loki_prefill_attention(loki, query, key, value, ranges, scaling, keys_rotated)
