"""How many principal dims (d) and tokens (k) Loki spends: one definition shared by every code path."""
from __future__ import annotations

import math

import torch


def check_fraction(name: str, value: float) -> float:
    """Validate a budget fraction in (0, 1]."""
    if not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def num_dims(d_frac: float, head_dim: int) -> int:
    """Principal dims used for the approximate scores: round(d_frac * D), at least 1."""
    return max(1, min(head_dim, round(check_fraction("d_frac", d_frac) * head_dim)))


def num_tokens(n_visible: torch.Tensor, k_frac: float) -> torch.Tensor:
    """Tokens each query keeps: ceil(k_frac * n) clipped to [min(1, n), n]. `n_visible` is an int tensor of any shape."""
    n = n_visible.to(torch.int64)
    k = torch.ceil(n.to(torch.float64) * check_fraction("k_frac", k_frac) - 1e-9).to(torch.int64)
    return torch.minimum(k.clamp_min(1), n)


def max_tokens(n_max: int, k_frac: float) -> int:
    """Upper bound of `num_tokens` over rows that see at most `n_max` tokens."""
    return min(n_max, max(1, math.ceil(n_max * check_fraction("k_frac", k_frac) - 1e-9)))
