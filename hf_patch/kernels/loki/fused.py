"""The whole decode step in one kernel, one program per selection row (short caches: fewer launches): the
approximate scores of stage 1, the one-program selection of stage 2, the attention of stage 3."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_block
from .attention import attend
from .common import LOG2E, load_heads, padded_len, store_heads
from .config import LokiKernelConfig, launch_options
from .problem import DecodeProblem
from .scores import approx_tile, key_dims
from .select import select_row
from .workspace import DecodeWorkspace


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
    the group; +inf at protected positions), the exact top-k_b of `select_row`, then softmax attention over the
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
        qa = load_heads(q_ptr, b, head0, heads_per_row, stride_qb, stride_qh, offs_g, offs_da, d, UPCAST)
        kd_ok = key_dims(offs_da, d, KEY_WIDTH, BLOCK_DA)
        ka_base = ka_ptr + b * stride_kab + j * stride_kah
        for n0 in range(0, seq, BLOCK_NS):
            offs_n = n0 + tl.arange(0, BLOCK_NS)
            a = approx_tile(qa, ka_base, stride_kas, offs_n, offs_da, kd_ok, end, start, sink, recent, PROTECT,
                            DOT_PREC, UPCAST)
            a = tl.max(tl.where((offs_g < heads_per_row)[:, None], a, float("-inf")), axis=0)
            tl.store(s_row + offs_n, a, mask=offs_n < padded_len(seq))  # -inf past seq
        tl.debug_barrier()
        select_row(s_row, c_ptr + row.to(tl.int64) * c_stride, i_row, seq, kb, sample_stride, n_sample,
                   SAMPLE, SELECT_BLOCK, MARGIN_SIGMAS, PADDED=True)
        tl.debug_barrier()
        q = load_heads(q_ptr, b, head0, heads_per_row, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, UPCAST)
        m_i, l_i, acc = attend(q, k_ptr + b * stride_kb + j * stride_kh, v_ptr + b * stride_vb + j * stride_vh,
                               i_row, 0, kb, stride_ks, stride_vs, qk_scale, offs_d, d_ok, m_i, l_i, acc,
                               BLOCK_N, DOT_PREC, UPCAST)
    store_heads(out_ptr, b, head0, heads_per_row, stride_ob, stride_oh, offs_g, offs_d, d_ok, l_i, acc)


def triton_fused(p: DecodeProblem, q: torch.Tensor, keys: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, scaling: float, cfg: LokiKernelConfig,
                 out: torch.Tensor, workspace: DecodeWorkspace) -> torch.Tensor:
    """All three stages in one kernel, one program per selection row, into `out` [B, Hq, D] (for short
    caches)."""
    rows, s, k, k_b = p.batch * p.rows_per_batch, p.seq, p.k, p.k_b
    ws = workspace.on(q.device)
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
        heads_per_row, p.d_max, stride, min(cfg.select_sample, triton.cdiv(s, stride)), scaling * LOG2E,
        p.sink, p.recent, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1),
        PER_HEAD_D=p.dims is not None, HAS_START=kv_start is not None, HAS_END=kv_end is not None,
        HAS_KB=k_b is not None, PROTECT=p.protect, KEY_WIDTH=keys.shape[-1], HEAD_DIM=p.head_dim,
        BLOCK_G=dot_block(heads_per_row),
        BLOCK_DA=dot_block(p.d_max), BLOCK_D=dot_block(p.head_dim), BLOCK_NS=cfg.block_n_fused,
        BLOCK_N=cfg.block_n_fused_attn, SAMPLE=cfg.select_sample, SELECT_BLOCK=cfg.select_block, MARGIN_SIGMAS=5.0,
        **{**launch_options(cfg, q), "num_warps": cfg.fused_warps},
    )
    return out
