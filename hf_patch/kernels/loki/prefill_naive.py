"""Loki for many query rows at once in PyTorch: the reference of the prefill kernels (`prefill`), and what runs
where they do not (CPU, float64, head dims above their limit, visible masks that are not causal + one key range
per sequence). Any device and dtype; the approximate scores in float32 (from the same operands as the kernels'),
a masked dense computation: score every visible key, keep each row's protected keys and its best others, exact
softmax attention over the kept keys.

Ties at a row's threshold are broken by ``torch.topk``, not by position as in the kernels.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def protected_keys(visible: torch.Tensor, sink: int, recent: int) -> torch.Tensor | None:
    """bool like `visible` [..., S]: each row's first `sink` and last `recent` visible keys (None if both are 0)."""
    if not (sink or recent):
        return None
    seen = visible.to(torch.int32).cumsum(-1)  # how many visible keys up to and including each position
    total = seen[..., -1:]
    return visible & ((seen <= sink) | (seen > total - recent))


def selection_mask(scores: torch.Tensor, visible: torch.Tensor, kb: torch.Tensor, sink: int, recent: int,
                   group: bool) -> torch.Tensor:
    """Top-k selection mask from approximate scores.

    scores: [B, H_kv, G, T, S] approximate scores; visible: [B or 1, 1, T, S]; kb: int [B, T] keys each row keeps
    (its protected keys included); sink, recent: each row's first `sink` and last `recent` visible keys are kept
    whatever their scores; group: one selection per KV head on the max over its G query heads.
    Returns bool [B, H_kv, G or 1, T, S]: per row, its protected keys and the best other visible keys.
    """
    vis = visible[:, :, None]  # [B, 1, 1, T, S]
    scores = scores.float().masked_fill(~vis, float("-inf"))
    if group:
        scores = scores.amax(dim=2, keepdim=True)
    protected = protected_keys(vis, sink, recent)
    if protected is not None:
        scores = scores.masked_fill(protected, float("inf"))
    k_max = int(kb.max()) if kb.numel() else 0
    if k_max == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    # each row keeping min(k_max, what it sees) (the paper rule): the k_max best of every row, unsorted, and no
    # more than its visible keys; else rank them and keep each row's own count
    uniform = torch.equal(kb, torch.minimum(vis.sum(-1)[:, 0, 0], torch.tensor(k_max)))
    idx = scores.topk(k_max, dim=-1, sorted=not uniform).indices
    if uniform:
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True) & vis
    keep = torch.arange(k_max, device=scores.device) < kb[:, None, None, :, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, keep.expand_as(idx))


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Exact attention of query [B, H_q, T, D] over the keys `mask` [B|1, 1|H_q, T, S] allows -> [B, T, H_q, D];
    rows that see no key (padding) attend to nothing."""
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                     enable_gqa=True)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0).transpose(1, 2)


def loki_prefill_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: torch.Tensor,
                                 ka: torch.Tensor, kb: torch.Tensor, visible: torch.Tensor, *, group: bool,
                                 scaling: float, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """`loki_prefill_attention` in PyTorch -> [B, T, Hq, D] in q.dtype.

    q: [B, Hq, T, D] queries (rotated into the basis iff the keys are); k, v: [B, Hkv, S, D]; qa: [B, Hq, T, d'],
    ka: [B, Hkv, S, d'] approximate queries and keys (zero past each KV head's d; any d', no padding needed);
    kb: int [B, T] keys kept by each row (protected keys included); visible: bool [B or 1, 1, T, S], the keys
    each row may attend to (any mask: the kernels' `ranges` are one case); group, scaling, sink, recent as in
    `loki_prefill_attention`.
    """
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    # float32 scores from the same bf16/fp16 operands as the kernels, [B, Hkv, G * T, S]
    scores = torch.matmul(qa.unflatten(1, (hkv, g)).flatten(2, 3).float(), ka.float().transpose(-1, -2))
    selected = selection_mask(scores.unflatten(2, (g, t)), visible.expand(b, -1, -1, -1), kb, sink, recent, group)
    mask = selected.expand(-1, -1, g, -1, -1).flatten(1, 2)  # [B, Hq, T, S]
    return masked_attention(q, k, v, mask, scaling)
