"""Decode stage 3: exact softmax attention of each selection row's query heads over its kept keys, gathered by
position, split over the kept keys (split-K, online softmax in float32); the last split of each row merges the
splits' partials into the output (`triton_attend`). Without positions the same kernel attends densely to every
valid key (`launch_attention`: the dense step). `attend` is shared with the fused kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_block, num_sms
from .common import LOG2E, load_heads, online_softmax_step, store_heads
from .config import LokiKernelConfig, launch_options, split_work
from .problem import DecodeProblem
from .workspace import DecodeWorkspace


@triton.jit
def attend(q, k_base, v_base, i_row, n_lo, n_hi, stride_ks, stride_vs, qk_scale, offs_d, d_ok, m_i, l_i, acc,
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
    q = load_heads(q_ptr, b, head0, heads_per_row, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, UPCAST)
    n_lo = split * tiles_per_prog * BLOCK_N
    m_i, l_i, acc = attend(q, k_ptr + b * stride_kb + j * stride_kh, v_ptr + b * stride_vb + j * stride_vh,
                           idx_ptr + row.to(tl.int64) * i_stride, n_lo,
                           tl.minimum(n_lo + tiles_per_prog * BLOCK_N, kb),
                           stride_ks, stride_vs, qk_scale, offs_d, d_ok,
                           tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
                           tl.zeros([BLOCK_G, BLOCK_D], tl.float32), BLOCK_N, DOT_PREC, UPCAST, DENSE, pos0)
    if n_split == 1:
        store_heads(out_ptr, b, head0, heads_per_row, stride_ob, stride_oh, offs_g, offs_d, d_ok, l_i, acc)
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


def triton_attend(p: DecodeProblem, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, idx: torch.Tensor,
                  scaling: float, cfg: LokiKernelConfig, out: torch.Tensor, workspace: DecodeWorkspace) -> torch.Tensor:
    """Stage 3: exact attention over the rows `idx` [rows, k] (the first k_b of each row) of K and V
    [B, Hkv, S, D] into `out` [B, Hq, D] (split-K; the last split of each row merges)."""
    rows, k = idx.shape
    heads_per_row = p.group_size if p.group else 1
    launch_attention(q, k_cache, v_cache, out, scaling, cfg, workspace, rows, p.rows_per_batch, heads_per_row, k,
                     idx=idx, k_b=p.k_b)
    return out


def launch_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     scaling: float, cfg: LokiKernelConfig, workspace: DecodeWorkspace, rows: int, rows_per_batch: int,
                     heads_per_row: int, k: int, idx: torch.Tensor | None = None, k_b: torch.Tensor | None = None,
                     kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None) -> None:
    """Launch `_attention_kernel` over `rows` rows of `heads_per_row` query heads: over the positions `idx`
    [rows, >= k] (the first k_b or k of each row), or, without idx, densely over [kv_start, kv_end) of all k = S."""
    n_split, tiles = split_work(k, cfg.block_n_attn, rows, cfg.programs_per_sm * num_sms(q.device))
    ws = workspace.on(q.device)
    part = ws.get("partials", rows, n_split * heads_per_row * (q.shape[-1] + 2), torch.float32)
    done = ws.get("attend_done", 1, rows, torch.int32, zeros=True)
    dummy = part  # pointer arguments a constexpr switches off
    _attention_kernel[(rows, n_split)](
        q, k_cache, v_cache, dummy if idx is None else idx, dummy if k_b is None else k_b,
        dummy if kv_start is None else kv_start, dummy if kv_end is None else kv_end, part, done, out,
        k, 0 if idx is None else idx.stride(0), part.stride(0), rows_per_batch,
        1 if heads_per_row > 1 else q.shape[1] // k_cache.shape[1], heads_per_row, tiles, n_split, scaling * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        HAS_KB=k_b is not None, DENSE=idx is None, HAS_START=kv_start is not None, HAS_END=kv_end is not None,
        HEAD_DIM=q.shape[-1], BLOCK_G=dot_block(heads_per_row), BLOCK_D=dot_block(q.shape[-1]),
        BLOCK_N=cfg.block_n_attn, BLOCK_S=min(32, triton.next_power_of_2(n_split)),
        **{**launch_options(cfg, q), "num_warps": cfg.attn_warps},
    )
