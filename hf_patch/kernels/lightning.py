"""Lightning Attention-2 in Triton (forward and backward) and the public dispatcher ``lightning_attn``.

One kernel does the work. It runs a causal decayed linear attention ``out_i = a_i @ S_i`` over a *virtual*
sequence (the real one, or the real one read backwards), chunk by chunk, keeping the ``[K, BV]`` state on chip:

    intra: [(A_c B_c^T) * M] C_c          (M_ij = lam^(i-j), j <= i, within a chunk)
    inter: diag(lam^(i + q_off)) A_c S     (q_off = 1 forwards, 0 backwards)
    state: S = lam^n S + (diag(lam^(n - i - q_off)) B_c)^T C_c

Forward is ``(a, b, c) = (q, k, v)``. The backward is the same kernel three times: ``dq = fwd(do, v, k)`` from
``S_0^T``, ``dv = rev(k, q, do)`` and ``dk = rev(v, do, q)`` from the final-state gradient, where ``rev`` reads the
sequence from its end; ``dv``'s final state is the gradient of the initial state.

Parallelism: programs over (value block, head, segment). A sequence too long to fill the GPU with
``B * H * V / BV`` programs is cut into segments. Each segment's local end state is one weighted reduction
``sum_i lam^(end - i - q_off) b_i^T c_i`` (a matmul over the segment's tokens, no recurrence), a light scan over
segments turns those into entry states, and the main launch runs all segments at once. The forward's entry states,
transposed, are the ``dq`` pass's; ``dv``'s, transposed, are ``dk``'s: one segment pass per direction. No O(T^2)
or per-chunk state buffer is kept; the only extra memory is one ``[K, V]`` float32 state per segment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import dot_block, num_sms
from .lightning_torch import check_lightning_inputs, lightning_attn_chunked

CHUNK = 64
MAX_HEAD_DIM = 256
STATE_ELEMS = 128 * 128  # float32 [K, BV] accumulator of a segment-state program: all 128 columns at K = 128


@triton.jit
def _segment_rows(SEG_SEQ, SEG_OFF, CU, i_s, seg_len):
    """Sequence id, first token row, length and the virtual position range ``[p_begin, p_end)`` of segment i_s."""
    seq = tl.load(SEG_SEQ + i_s)
    seq_start = tl.load(CU + seq).to(tl.int64)
    seq_len = tl.load(CU + seq + 1).to(tl.int64) - seq_start
    p_begin = (i_s - tl.load(SEG_OFF + seq)).to(tl.int64) * seg_len
    p_end = tl.minimum(p_begin + seg_len, seq_len)
    return seq, seq_start, seq_len, p_begin, p_end


@triton.jit
def _chunk_scan_kernel(
    A, B, C, OUT, LOG_DECAY, ENTRY, FINAL, SEG_SEQ, SEG_OFF, CU,
    seg_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
    REVERSE: tl.constexpr, HAS_ENTRY: tl.constexpr, ENTRY_T: tl.constexpr, HAS_FINAL: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (value block, head, segment): walk the segment's chunks and write ``OUT``.

    A, B: [total, H, K]; C, OUT: [total, H, V]; ENTRY: [segments, H, K, V] float32 (the state entering each
    segment; [segments, H, V, K] if ENTRY_T, read transposed); FINAL: [N, H, K, V] float32, written by the last
    segment of each sequence.
    """
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_s = tl.program_id(2)
    seq, seq_start, seq_len, p_begin, p_end = _segment_rows(SEG_SEQ, SEG_OFF, CU, i_s, seg_len)

    log_lam = tl.load(LOG_DECAY + i_h)
    r = tl.arange(0, CHUNK)
    q_exp = (r + (0 if REVERSE else 1)).to(tl.float32)
    q_w = tl.exp(q_exp * log_lam)
    gap = (r[:, None] - r[None, :]).to(tl.float32)
    intra_w = tl.exp(tl.where(r[:, None] >= r[None, :], gap * log_lam, float("-inf")))

    offs_k = tl.arange(0, KP)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    state_offs = i_h * K * V + offs_k[:, None] * V + offs_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    if HAS_ENTRY:
        if ENTRY_T:
            entry_offs = i_h * K * V + offs_v[None, :] * K + offs_k[:, None]
        else:
            entry_offs = state_offs
        state = tl.load(ENTRY + i_s.to(tl.int64) * H * K * V + entry_offs, mask=state_mask, other=0.0)
    else:
        state = tl.zeros([KP, BV], dtype=tl.float32)

    for p in range(p_begin, p_end, CHUNK):
        pos = p + r
        row_mask = pos < p_end
        if REVERSE:
            rows = seq_start + seq_len - 1 - pos
        else:
            rows = seq_start + pos
        kv_rows = (rows * H + i_h)[:, None]
        a = tl.load(A + kv_rows * K + offs_k[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(B + kv_rows * K + offs_k[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        c = tl.load(C + kv_rows * V + offs_v[None, :], mask=row_mask[:, None] & mask_v[None, :], other=0.0)
        a = a.to(MM_DTYPE)
        b = b.to(MM_DTYPE)
        c = c.to(MM_DTYPE)
        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION) * intra_w
        out = tl.dot(scores.to(MM_DTYPE), c, input_precision=PRECISION)
        out += tl.dot(a, state.to(MM_DTYPE), input_precision=PRECISION) * q_w[:, None]
        tl.store(OUT + kv_rows * V + offs_v[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_mask[:, None] & mask_v[None, :])
        n = tl.minimum(p_end - p, CHUNK).to(tl.float32)
        k_w = tl.where(row_mask, tl.exp(tl.maximum(n - q_exp, 0.0) * log_lam), 0.0)
        b_w = (b * k_w[:, None]).to(MM_DTYPE)
        state = state * tl.exp(n * log_lam) + tl.dot(tl.trans(b_w), c, input_precision=PRECISION)

    if HAS_FINAL:
        if p_end == seq_len:
            tl.store(FINAL + seq.to(tl.int64) * H * K * V + state_offs, state, mask=state_mask)


@triton.jit
def _segment_state_kernel(
    B, C, STATES, LOG_DECAY, SEG_SEQ, SEG_OFF, CU,
    seg_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KP: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
    REVERSE: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (value block, head, segment): the segment's local end state ``sum_i lam^(p_end - i - q_off) b_i^T c_i``.

    A plain reduction over the segment's tokens (no recurrence between chunks). B: [total, H, K]; C: [total, H, V];
    STATES: [segments, H, K, V] float32.
    """
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_s = tl.program_id(2)
    seq, seq_start, seq_len, p_begin, p_end = _segment_rows(SEG_SEQ, SEG_OFF, CU, i_s, seg_len)
    log_lam = tl.load(LOG_DECAY + i_h)
    r = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, KP)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    acc = tl.zeros([KP, BV], dtype=tl.float32)
    # a sequence's last segment: no later segment enters from it, so its local state is never read (left zero)
    p_stop = tl.where(p_end < seq_len, p_end, p_begin)
    for p in range(p_begin, p_stop, CHUNK):
        pos = p + r
        row_mask = pos < p_end
        if REVERSE:
            rows = seq_start + seq_len - 1 - pos
        else:
            rows = seq_start + pos
        kv_rows = (rows * H + i_h)[:, None]
        b = tl.load(B + kv_rows * K + offs_k[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        c = tl.load(C + kv_rows * V + offs_v[None, :], mask=row_mask[:, None] & mask_v[None, :], other=0.0)
        dist = (p_end - pos - (0 if REVERSE else 1)).to(tl.float32)
        w = tl.where(row_mask, tl.exp(tl.maximum(dist, 0.0) * log_lam), 0.0)
        b_w = (b.to(tl.float32) * w[:, None]).to(MM_DTYPE)
        acc = tl.dot(tl.trans(b_w), c.to(MM_DTYPE), acc, input_precision=PRECISION)
    state_offs = i_h * K * V + offs_k[:, None] * V + offs_v[None, :]
    tl.store(STATES + i_s.to(tl.int64) * H * K * V + state_offs, acc, mask=mask_k[:, None] & mask_v[None, :])


@triton.jit
def _segment_scan_kernel(
    STATES, INIT, LOG_DECAY, SEG_OFF, CU, seg_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """One (state block, head, sequence): turn local segment end states into segment entry states, in place.

    STATES: [segments, H, K, V] float32; INIT: [N, H, K, V] float32.
    """
    n_kb = tl.cdiv(K, BK)
    i_k = tl.program_id(0) % n_kb
    i_v = tl.program_id(0) // n_kb
    i_h = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(CU + seq + 1) - tl.load(CU + seq)
    first = tl.load(SEG_OFF + seq)
    last = tl.load(SEG_OFF + seq + 1)
    log_lam = tl.load(LOG_DECAY + i_h)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs = i_h * K * V + offs_k[:, None] * V + offs_v[None, :]
    mask = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    if HAS_INIT:
        state = tl.load(INIT + seq.to(tl.int64) * H * K * V + offs, mask=mask, other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for s in range(first, last):
        n = tl.minimum(seg_len, seq_len - (s - first) * seg_len).to(tl.float32)
        ptr = STATES + s * (H * K * V) + offs
        local = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, state, mask=mask)
        state = state * tl.exp(n * log_lam) + local


@dataclass(frozen=True)
class LightningConfig:
    """Launch settings of the Triton path; scripts/bench_lightning.py sweeps them. The chunk-scan kernel of
    segmented bf16/fp16 calls (long sequences, one wave of programs) pipelines deeper: 3 stages took 4.42 / 4.55 /
    4.68 ms fwd+bwd at 32k / 64k / 128k against 4.62 / 4.70 / 4.76 with 2, which stay best for whole sequences
    (3.69 ms at 1k, 4.04 with 3; H100, BENCHMARKS.md)."""

    num_warps: int = 4  # chunk-scan kernel
    num_stages: int = 2  # chunk-scan kernel of whole sequences and float32 calls; segment-state kernel
    segmented_num_stages: int = 3  # chunk-scan kernel of segmented bf16/fp16 calls
    programs_per_sm: int = 4  # segments aim at one wave of this many programs per SM
    min_segment: int = 512  # tokens per segment at least
    state_num_warps: int = 8  # segment-state kernel


DEFAULT_CONFIG = LightningConfig()


class _Plan(NamedTuple):
    """How sequences are cut into segments: ``seg_seq [S]`` and ``seg_off [N + 1]`` (int32, on the device)."""

    seg_len: int
    seg_seq: torch.Tensor
    seg_off: torch.Tensor
    multi: bool  # False: every sequence is one segment (segment i is sequence i)


def _block_v(dim_k: int, dim_v: int) -> int:
    """Value columns per chunk-kernel program: as many as a ``[K, BV]`` float32 state in registers allows (64 up to
    K = 128, 32 beyond). Narrower blocks, tried as a way to fill the SMs, were slower than segments on the H100
    (BENCHMARKS.md)."""
    return min(64 if dot_block(dim_k) <= 128 else 32, dot_block(dim_v))


def _plan(lengths: tuple[int, ...] | None, num_seqs: int, seq_len: int, heads: int, dim_k: int, dim_v: int,
          device: torch.device, seg_len: int | None, cfg: LightningConfig) -> _Plan:
    """Segments: how a call is spread over programs (value block, head, segment). Cached per shape and launch
    setting, so a call with equal-length sequences makes no host-to-device copy (a copy from pageable memory
    waits for the GPU)."""
    return _cached_plan(lengths, num_seqs, seq_len, heads, dim_k, dim_v, device, seg_len, cfg.programs_per_sm,
                        cfg.min_segment)


@functools.lru_cache(maxsize=64)
def _cached_plan(lengths: tuple[int, ...] | None, num_seqs: int, seq_len: int, heads: int, dim_k: int, dim_v: int,
                 device: torch.device, seg_len: int | None, programs_per_sm: int, min_segment: int) -> _Plan:
    """`_plan`'s work.

    Segments cost two extra passes (entry states, forwards and backwards), so sequences stay whole while there is
    a program per SM (counted over the wider of K and V: the backward swaps them). Otherwise the longest sequence
    is cut into as many equal parts as keep all programs within one wave of ``programs_per_sm`` per SM: a second,
    partial wave costs about as much as the first (H100: 16 segments of a 128k sequence, 512 programs, 5.6 ms
    fwd+bwd; 17 segments, 544 programs, 6.6 ms).
    """
    longest = seq_len if lengths is None else max(lengths)
    sms = num_sms(device)
    width = max(dim_k, dim_v)
    programs = num_seqs * heads * triton.cdiv(width, _block_v(width, width))
    if seg_len is None:
        if programs >= sms:
            seg_len = longest
        else:
            parts = max(1, programs_per_sm * sms // programs)
            seg_len = max(min_segment, -(-longest // parts))
    seg_len = max(CHUNK, -(-seg_len // CHUNK) * CHUNK)
    if seg_len >= longest:
        seq_ids = torch.arange(num_seqs, device=device, dtype=torch.int32)
        offsets = torch.arange(num_seqs + 1, device=device, dtype=torch.int32)
        return _Plan(seg_len, seq_ids, offsets, False)
    if lengths is None:  # built on the device: no copy
        per_seq = -(-seq_len // seg_len)
        seq_ids = torch.arange(num_seqs * per_seq, device=device, dtype=torch.int32) // per_seq
        offsets = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * per_seq
        return _Plan(seg_len, seq_ids, offsets, True)
    counts = torch.tensor([max(1, -(-n // seg_len)) for n in lengths], dtype=torch.int32)
    offsets = torch.zeros(num_seqs + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    seq_ids = torch.repeat_interleave(torch.arange(num_seqs, dtype=torch.int32), counts)
    return _Plan(seg_len, seq_ids.to(device), offsets.to(device), True)


def _dot_consts(x: torch.Tensor) -> dict:
    """Dot operand dtype and precision for inputs of x's dtype (bf16 stays bf16, float32 runs as tf32x3)."""
    return dict(MM_DTYPE=tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float32,
                PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32")


def _segment_entries(b, c, log_decay, cu, plan: _Plan, num_seqs: int, init, reverse: bool,
                     cfg: LightningConfig) -> torch.Tensor:
    """State entering each segment, ``[segments, H, K, V]`` float32 (b: [total, H, K], c: [total, H, V]).

    The local-state programs take all value columns up to ``STATE_ELEMS`` (b read once); the scan runs over
    32 x 32 state blocks (enough programs to hide its latency)."""
    _, heads, dim_k = b.shape
    dim_v = c.shape[-1]
    kp = dot_block(dim_k)
    bv = min(dot_block(dim_v), max(16, STATE_ELEMS // kp))
    n_segs = plan.seg_seq.numel()
    states = torch.empty(n_segs, heads, dim_k, dim_v, device=b.device, dtype=torch.float32)
    _segment_state_kernel[(triton.cdiv(dim_v, bv), heads, n_segs)](
        b, c, states, log_decay, plan.seg_seq, plan.seg_off, cu, plan.seg_len,
        H=heads, K=dim_k, V=dim_v, KP=kp, BV=bv, CHUNK=CHUNK, REVERSE=reverse, **_dot_consts(b),
        num_warps=cfg.state_num_warps, num_stages=cfg.num_stages)
    blk = 32
    _segment_scan_kernel[(triton.cdiv(dim_k, blk) * triton.cdiv(dim_v, blk), heads, num_seqs)](
        states, init if init is not None else states, log_decay, plan.seg_off, cu, plan.seg_len,
        H=heads, K=dim_k, V=dim_v, BK=blk, BV=blk, HAS_INIT=init is not None)
    return states


def _chunk_stages(plan: _Plan, dtype: torch.dtype, cfg: LightningConfig) -> int:
    """Pipeline stages of the chunk-scan kernel: deeper for segmented half-precision calls (float32 tiles would
    exceed the shared memory)."""
    deep = plan.multi and dtype != torch.float32
    return cfg.segmented_num_stages if deep else cfg.num_stages


def _chunk_scan(a, b, c, log_decay, cu, plan: _Plan, num_seqs: int, entry, reverse: bool, want_final: bool,
                out_dtype: torch.dtype, cfg: LightningConfig,
                entry_t: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out_i = a_i @ S_i`` over each sequence (read backwards if ``reverse``); see the module docstring.

    a, b: [total, H, K]; c: [total, H, V] (contiguous); cu: int32 [N + 1]; entry: [segments, H, K, V] float32
    (``[segments, H, V, K]`` if ``entry_t``: read transposed) or None (zero). Returns ``out [total, H, V]`` in
    ``out_dtype`` and the final state ``[N, H, K, V]`` float32 if ``want_final``.
    """
    total, heads, dim_k = b.shape
    dim_v = c.shape[-1]
    bv = _block_v(dim_k, dim_v)
    out = torch.empty(total, heads, dim_v, device=b.device, dtype=out_dtype)
    final = torch.empty(num_seqs, heads, dim_k, dim_v, device=b.device, dtype=torch.float32) if want_final else None
    _chunk_scan_kernel[(triton.cdiv(dim_v, bv), heads, plan.seg_seq.numel())](
        a, b, c, out, log_decay, entry if entry is not None else c, final if final is not None else c,
        plan.seg_seq, plan.seg_off, cu, plan.seg_len,
        H=heads, K=dim_k, V=dim_v, KP=dot_block(dim_k), BV=bv, CHUNK=CHUNK, REVERSE=reverse,
        HAS_ENTRY=entry is not None, ENTRY_T=entry_t, HAS_FINAL=want_final, **_dot_consts(b),
        num_warps=cfg.num_warps, num_stages=_chunk_stages(plan, b.dtype, cfg))
    return out, final


class _LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, cu, plan, num_seqs, output_final_state, cfg):
        init = None if initial_state is None else initial_state.float().contiguous()
        entry = _segment_entries(k, v, log_decay, cu, plan, num_seqs, init, False, cfg) if plan.multi else init
        o, final = _chunk_scan(q, k, v, log_decay, cu, plan, num_seqs, entry, False, output_final_state, q.dtype,
                               cfg)
        ctx.save_for_backward(q, k, v, log_decay, entry, cu)
        ctx.meta = (plan, num_seqs, cfg)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, log_decay, entry, cu = ctx.saved_tensors
        plan, num_seqs, cfg = ctx.meta
        do = do.contiguous()
        d_final = None if d_final is None else d_final.float().contiguous()
        # dq runs forwards over S^T: the forward's entry states, read transposed; dk likewise from dv's.
        dq, _ = _chunk_scan(do, v, k, log_decay, cu, plan, num_seqs, entry, False, False, q.dtype, cfg, entry_t=True)
        rev_entry = (_segment_entries(q, do, log_decay, cu, plan, num_seqs, d_final, True, cfg) if plan.multi
                     else d_final)
        want_d_init = ctx.needs_input_grad[4]
        dv, d_init = _chunk_scan(k, q, do, log_decay, cu, plan, num_seqs, rev_entry, True, want_d_init, v.dtype, cfg)
        dk, _ = _chunk_scan(v, do, q, log_decay, cu, plan, num_seqs, rev_entry, True, False, k.dtype, cfg,
                            entry_t=True)
        return dq, dk, dv, None, d_init, None, None, None, None, None


def lightning_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    seg_len: int | None = None,
    config: LightningConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path of ``lightning_attn`` (any device Triton runs on; tests use its CPU interpreter).

    ``seg_len`` (tokens, a multiple of 64) forces how sequences are cut into parallel segments; default: enough
    segments to fill the GPU. ``config``: launch settings (default ``LightningConfig()``).
    """
    num_seqs, bounds = check_lightning_inputs(q, k, v, decay, initial_state, cu_seqlens)
    if q.dtype == torch.float64:
        raise ValueError("the Triton kernels take float16, bfloat16 or float32; use lightning_attn_chunked for float64")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported; got D = {q.shape[-1]}, E = {v.shape[-1]}")
    if decay.requires_grad and torch.is_grad_enabled():
        raise ValueError("decay is not trainable in the Triton kernels; pass decay.detach() (or a buffer)")
    batch, seq_len, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if cu_seqlens is None:
        cu = torch.arange(0, (batch + 1) * seq_len, seq_len, device=q.device, dtype=torch.int32)
        lengths = None
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        lengths = tuple(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    flat = [x.reshape(batch * seq_len, heads, x.shape[-1]).contiguous() for x in (q, k, v)]
    log_decay = torch.log(decay.detach().to(device=q.device, dtype=torch.float32)).contiguous()
    cfg = config or DEFAULT_CONFIG
    plan = _plan(lengths, num_seqs, seq_len, heads, dim_k, dim_v, q.device, seg_len, cfg)
    o, final = _LightningAttnFunction.apply(*flat, log_decay, initial_state, cu, plan, num_seqs, output_final_state,
                                            cfg)
    return o.view(batch, seq_len, heads, dim_v), final


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay (Lightning Attention-2).

    q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; decay: ``[H]`` with lambda in (0, 1]; initial_state:
    ``[B, H, D, E]`` (``[N, H, D, E]`` with ``cu_seqlens`` int32 ``[N + 1]`` and ``B == 1``).
    ``o_t = q_t @ S_t`` with ``S_t = lam * S_{t-1} + k_t^T v_t`` (no scale, no normaliser).
    Returns ``o [B, T, H, E]`` in ``q.dtype`` and, if ``output_final_state``, the float32 final state.
    CUDA tensors run the Triton kernels (gradients for q, k, v and initial_state; none for decay); anything else
    runs ``lightning_attn_chunked``.
    """
    if q.is_cuda and q.dtype != torch.float64:
        return lightning_attn_triton(q, k, v, decay, initial_state, output_final_state, cu_seqlens)
    return lightning_attn_chunked(q, k, v, decay, initial_state, output_final_state, cu_seqlens)
