"""Per-layer, per-head decay rates lambda of the TransNormer linear attention (SPEC §3)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes s_h = 2^(-8(h+1)/H) for H a power of two; the usual interleaving otherwise."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if math.log2(num_heads).is_integer():
        return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]
    closest = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


@lru_cache(maxsize=32)
def _decays(schedule: str, num_layers: int, num_heads: int) -> torch.Tensor:
    if schedule == "transnormerllm":
        slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
        # Published: s * (1 - l/(L-1) + 1e-5). With one layer that formula divides by zero; use its first layer.
        depth = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)
        return torch.exp(-slopes[None, :] * (1.0 - depth[:, None] + 1e-5))
    if schedule == "fla":
        heads = torch.arange(num_heads, dtype=torch.float64)
        depth = torch.arange(num_layers, dtype=torch.float64) / num_layers
        return torch.exp(-(8.0 * heads[None, :] / num_heads) * (1.0 - depth[:, None]))
    raise ValueError(f"unknown decay schedule {schedule!r}; use 'transnormerllm' or 'fla'")


def layer_decays(schedule: str, num_layers: int, num_heads: int) -> torch.Tensor:
    """Decay lambda in (0, 1] of every layer and head, float64 [L, H] on the CPU (a fresh copy)."""
    return _decays(schedule, num_layers, num_heads).clone()
