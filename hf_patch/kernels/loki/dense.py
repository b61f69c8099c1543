"""The dense decode step: exact attention of one query token per sequence over every valid key of a cache (the
step of a budget that keeps every key), through the split-K attention kernel of stage 3 without positions."""
from __future__ import annotations

import torch

from .attention import launch_attention
from .config import DEFAULT_CONFIG, TRITON_DTYPES
from .naive import dense_decode_attention_torch
from .problem import check_dense
from .workspace import DecodeWorkspace


def dense_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
                                  kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None,
                                  out: torch.Tensor | None = None,
                                  workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """`dense_decode_attention` with the split-K Triton kernel (bf16/fp16/fp32; CUDA, or CPU under
    TRITON_INTERPRET=1): each KV head's G query heads in one pass over its keys. `out` and `workspace` as in
    `loki_decode_attention_triton`."""
    check_dense(q, k_cache, v_cache, kv_start, kv_end)
    b, hq, _ = q.shape
    hkv, s = k_cache.shape[1:3]
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton path takes {TRITON_DTYPES}, got {q.dtype}: use dense_decode_attention_torch")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if s == 0:
        return out.zero_()
    launch_attention(q, k_cache, v_cache, out, scaling, DEFAULT_CONFIG, workspace or DecodeWorkspace(), b * hkv, hkv,
                     hq // hkv, s, kv_start=kv_start, kv_end=kv_end)
    return out


def dense_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
                           kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None,
                           workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """Exact attention of one query token per sequence over the valid keys of a cache (a decode step whose budget
    keeps every key): q [B, Hq, D], k_cache / v_cache [B, Hkv, S, D] (GQA: query head h reads KV head h // G; keys
    and queries in any one basis); kv_start / kv_end: int [B] on q's device, the valid range [kv_start, kv_end)
    (None: 0 / S; read on the device, no host sync: a CUDA graph replays it as the cache grows). Returns
    [B, Hq, D] in q.dtype (0 for a sequence without valid keys). CUDA bf16/fp16/fp32 runs the Triton kernel (with
    the scratch buffers of `workspace`, as in `loki_decode_attention`), anything else PyTorch."""
    if q.is_cuda and q.dtype in TRITON_DTYPES:
        return dense_decode_attention_triton(q, k_cache, v_cache, scaling=scaling, kv_start=kv_start, kv_end=kv_end,
                                             workspace=workspace)
    return dense_decode_attention_torch(q, k_cache, v_cache, scaling=scaling, kv_start=kv_start, kv_end=kv_end)
