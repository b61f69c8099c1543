"""Loki's attention ops, split by stage (flash-linear-attention's `ops/<op>/` layout).

Decode step (one query token per sequence): `decode` (arguments, form choice) over `scores` (stage 1), `select`
(stage 2), `attention` (stage 3), `fused` (the three in one kernel), `dense` (every valid key kept); `naive` holds
their PyTorch references. Many query rows (mode "all"): `prefill`, with `prefill_naive` as its reference. Shared:
`common` (Triton building blocks), `config` (launch settings), `problem` (argument checks), `workspace` (scratch
buffers).
"""
from .config import LokiKernelConfig
from .decode import loki_decode_attention, loki_decode_attention_triton
from .dense import dense_decode_attention, dense_decode_attention_triton
from .naive import dense_decode_attention_torch, loki_decode_attention_torch
from .prefill import LokiPrefillConfig, loki_prefill_attention
from .prefill_naive import loki_prefill_attention_torch
from .workspace import DecodeWorkspace

__all__ = ["DecodeWorkspace", "LokiKernelConfig", "LokiPrefillConfig", "dense_decode_attention",
           "dense_decode_attention_torch", "dense_decode_attention_triton", "loki_decode_attention",
           "loki_decode_attention_torch", "loki_decode_attention_triton", "loki_prefill_attention",
           "loki_prefill_attention_torch"]
