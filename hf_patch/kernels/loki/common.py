"""Triton building blocks shared by the Loki kernels (decode stages and prefill): order keys of float scores, one
step of an online softmax, loading and storing the query heads of a selection row.

Kernels take the integers that change with the cache length (S, k, tile and split counts) unspecialised
(`do_not_specialize`): Triton would otherwise compile a new variant whenever one of them changes its divisibility
by 16, i.e. again and again during generation (0.2-0.9 s each on the H100 machine).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def order_key(score):
    """float32 -> int32 whose signed order is the order of the floats (NaN aside; -0.0 and +0.0 map to one key,
    as they compare equal)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def load_heads(q_ptr, b, head0, n_heads, stride_qb, stride_qh, offs_g, offs_d, n_dims, UPCAST: tl.constexpr):
    """Rows head0 .. head0 + n_heads - 1 of q[b] as [BLOCK_G, BLOCK_D], zero past n_heads heads and n_dims dims."""
    q = tl.load(q_ptr + b * stride_qb + (head0 + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < n_heads)[:, None] & (offs_d < n_dims)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


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
def store_heads(out_ptr, b, head0, n_heads, stride_ob, stride_oh, offs_g, offs_d, d_ok, l_i, acc):
    """out[b, head0 + g] = acc[g] / l_i[g] for the row's heads (0 where nothing was kept)."""
    res = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + (head0 + offs_g)[:, None] * stride_oh + offs_d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=(offs_g < n_heads)[:, None] & d_ok[None, :])


@triton.jit
def padded_len(n):
    """n rounded up to 16, known to the compiler as a multiple of 16 (masks against it vectorize)."""
    return tl.multiple_of((n + 15) // 16 * 16, 16)
