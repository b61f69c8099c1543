"""Lightning Attention-2 dispatcher: Triton kernels on CUDA, the chunked PyTorch form elsewhere."""

from __future__ import annotations

import torch

from .lightning_torch import lightning_attn_chunked


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
    """
    return lightning_attn_chunked(q, k, v, decay, initial_state, output_final_state, cu_seqlens)
