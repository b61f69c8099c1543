"""Decode stage 1: approximate scores of the query heads of each KV head on its first d principal dims, over
one split of the cache per program (`triton_scores`); -inf outside each sequence's valid keys, +inf at its
protected positions. `key_dims` and `approx_tile` are shared with the fused kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_block, num_sms
from .common import load_heads, padded_len
from .config import LokiKernelConfig, launch_options, split_work
from .problem import DecodeProblem
from .workspace import DecodeWorkspace


@triton.jit
def key_dims(offs_d, d, KEY_WIDTH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dims of a key row that the approximate scores read: whole 8-element (16-byte) groups covering d, so the
    loads stay vectorized (a mask against a runtime d would split them into scalar loads; the extra dims meet
    zeros of q), within the KEY_WIDTH dims that the key buffer holds."""
    ok = (offs_d // 8) < tl.cdiv(d, 8)
    if KEY_WIDTH < BLOCK_D:
        ok = ok & (offs_d < KEY_WIDTH)
    return ok


@triton.jit
def approx_tile(q, k_base, stride_ks, offs_n, offs_d, kd_ok, end, start, sink, recent,
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
    PROTECT: +inf at the protected positions (`approx_tile`).
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
    q = load_heads(q_ptr, b, j * group_size, group_size, stride_qb, stride_qh, offs_g, offs_d, d, UPCAST)
    kd_ok = key_dims(offs_d, d, KEY_WIDTH, BLOCK_D)
    k_base = k_ptr + b * stride_kb + j * stride_kh
    for t in range(tiles_per_prog):
        offs_n = (split * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        a = approx_tile(q, k_base, stride_ks, offs_n, offs_d, kd_ok, end, start, sink, recent, PROTECT, DOT_PREC,
                        UPCAST)
        if GROUP:
            a = tl.max(tl.where(g_ok[:, None], a, float("-inf")), axis=0)
            tl.store(s_ptr + row.to(tl.int64) * s_stride + offs_n, a, mask=offs_n < padded_len(seq))
        else:
            out = s_ptr + (row.to(tl.int64) * group_size + offs_g)[:, None] * s_stride + offs_n[None, :]
            tl.store(out, a, mask=g_ok[:, None] & (offs_n < padded_len(seq))[None, :])


def triton_scores(p: DecodeProblem, q: torch.Tensor, keys: torch.Tensor, kv_start: torch.Tensor | None,
                  kv_end: torch.Tensor | None, cfg: LokiKernelConfig, workspace: DecodeWorkspace) -> torch.Tensor:
    """Stage 1: approximate scores, float32 [B*Hkv, S] ("group", max over the group) or [B*Hq, S] ("query"),
    from `keys` [B, Hkv, S, d'] (the key cache or its narrow copy); -inf outside [kv_start, kv_end), +inf at the
    protected positions. A view of `workspace`, valid until its next call."""
    b, hkv, g, s = p.batch, p.kv_heads, p.group_size, p.seq
    rows = b * p.rows_per_batch
    scores = workspace.on(q.device).get("scores", rows, s, torch.float32)
    n_split, tiles = split_work(s, cfg.block_n_scores, b * hkv, cfg.programs_per_sm * num_sms(q.device))
    _approx_scores_kernel[(b * hkv, n_split)](
        q, keys, p.dims if p.dims is not None else scores, kv_start if kv_start is not None else scores,
        kv_end if kv_end is not None else scores, scores,
        s, scores.stride(0), hkv, g, tiles, p.d_max, p.sink, p.recent,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        GROUP=p.group, PER_HEAD_D=p.dims is not None, HAS_START=kv_start is not None, HAS_END=kv_end is not None,
        PROTECT=p.protect, KEY_WIDTH=keys.shape[-1],
        BLOCK_G=dot_block(g), BLOCK_D=dot_block(p.d_max), BLOCK_N=cfg.block_n_scores, **launch_options(cfg, q),
    )
    return scores[:rows, :s]
