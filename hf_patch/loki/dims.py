"""How many principal dims each (layer, KV head) scores with."""
from __future__ import annotations

import torch

from .basis import PCABasis
from .budget import num_dims

D_POLICIES = ("uniform", "variance")


def allocate_dims(basis: PCABasis, d_frac: float, policy: str = "uniform") -> torch.Tensor:
    """Dims per head, int64 [L, H_kv], averaging round(d_frac * D).

    "uniform": every head gets the same d. "variance": the same total spent where it captures the most key
    variance: each head keeps at least one dim, and the remaining budget goes to the globally largest
    explained-variance ratios (optimal for the summed captured variance, as each head's spectrum is sorted).
    """
    if policy not in D_POLICIES:
        raise ValueError(f"d_policy must be one of {D_POLICIES}, got {policy!r}")
    layers, heads, dim = basis.eigenvalues.shape
    d = num_dims(d_frac, dim)
    if policy == "uniform":
        return torch.full((layers, heads), d, dtype=torch.int64)
    ev = basis.eigenvalues.double().clamp_min(0)
    ratio = ev / ev.sum(-1, keepdim=True).clamp_min(1e-30)
    extra = layers * heads * (d - 1)
    counts = torch.ones(layers * heads, dtype=torch.int64)
    if extra > 0:
        picks = ratio[..., 1:].reshape(-1).topk(extra).indices // (dim - 1)
        counts += torch.bincount(picks, minlength=layers * heads)
    return counts.view(layers, heads)
