"""The PyTorch decode steps (any device and dtype, float64 included): the reference of the Triton stages and what
runs where they do not (CPU, float64). `loki_decode_attention_torch` selects with ``torch.topk`` and gathers only
the kept rows of K and V; `dense_decode_attention_torch` attends to every valid key."""
from __future__ import annotations

import torch

from .problem import DecodeProblem, check_decode, check_dense


def _torch_scores(p: DecodeProblem, qg: torch.Tensor, keys: torch.Tensor, kv_start: torch.Tensor | None,
                  kv_end: torch.Tensor | None) -> torch.Tensor:
    """Approximate scores [B, Hkv, G or 1, S] of qg [B, Hkv, G, D] against the first dims of keys [B, Hkv, S, d'];
    -inf outside [kv_start, kv_end), +inf at the protected positions (kept first by any top-k)."""
    q_approx = qg[..., : p.d_max]
    if p.dims is not None:
        keep = torch.arange(p.d_max, device=qg.device) < p.dims[:, None]  # [Hkv, d_max]
        q_approx = q_approx * keep[None, :, None]
    scores = torch.matmul(q_approx, keys[..., : p.d_max].to(qg.dtype).transpose(-1, -2))  # [B, Hkv, G, S]
    if p.group:
        scores = scores.amax(dim=2, keepdim=True)  # [B, Hkv, 1, S]
    pos = torch.arange(p.seq, device=qg.device)[None, :]  # [1, S]
    lo = 0 if kv_start is None else kv_start[:, None].long()  # [B, 1]
    hi = p.seq if kv_end is None else kv_end[:, None].long()
    valid = (pos >= lo) & (pos < hi)  # [B or 1, S]
    if p.protect:
        protected = valid & ((pos < lo + p.sink) | (pos >= hi - p.recent))
        scores = scores.masked_fill(protected[:, None, None], float("inf"))
    return scores.masked_fill(~valid[:, None, None], float("-inf"))


def loki_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    d: int | tuple[int, ...] | torch.Tensor,
    k: int,
    scaling: float,
    k_b: torch.Tensor | None = None,
    sink: int = 0,
    recent: int = 0,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    gqa_select: str = "group",
    k_approx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loki decode step in PyTorch (any device; also float64). Same arguments and result as
    `loki_decode_attention`. Reads the first d dims of the keys (from `k_approx` when given) and gathers only
    the kept rows of K and V."""
    p = check_decode(q, k_cache, v_cache, d, k, k_b, sink, recent, kv_start, kv_end, gqa_select, k_approx)
    b, hkv, g, s, k_b = p.batch, p.kv_heads, p.group_size, p.seq, p.k_b
    if k == 0:
        return q.new_zeros(q.shape)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, hkv, g, p.head_dim).to(acc_dtype)  # [B, Hkv, G, D]
    scores = _torch_scores(p, qg, k_cache if k_approx is None else k_approx, kv_start, kv_end)
    idx = scores.topk(k, dim=-1, sorted=k_b is not None).indices  # [B, Hkv, G or 1, k]

    rows = idx.shape[2]
    gather = idx[..., None].expand(b, hkv, rows, k, p.head_dim)
    k_sel = k_cache[:, :, None].expand(b, hkv, rows, s, p.head_dim).gather(3, gather).to(acc_dtype)
    v_sel = v_cache[:, :, None].expand(b, hkv, rows, s, p.head_dim).gather(3, gather).to(acc_dtype)
    dead = None if k_b is None else torch.arange(k, device=q.device)[None, :] >= k_b[:, None]  # [B, k] unused slots
    if dead is not None:  # they may hold any key, e.g. unwritten memory past kv_end: 0 * NaN would be NaN
        v_sel = v_sel.masked_fill(dead[:, None, None, :, None], 0.0)
    if rows == g:  # query selection: each head has its own rows  [B, Hkv, G, k, D]
        logits = torch.matmul(qg[..., None, :], k_sel.transpose(-1, -2)).squeeze(-2)  # [B, Hkv, G, k]
    else:  # group selection: shared rows [B, Hkv, 1, k, D]
        logits = torch.matmul(qg, k_sel[:, :, 0].transpose(-1, -2))  # [B, Hkv, G, k]
    logits = logits * scaling
    if dead is not None:
        logits = logits.masked_fill(dead[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    if rows == g:
        out = torch.matmul(probs[..., None, :], v_sel).squeeze(-2)
    else:
        out = torch.matmul(probs, v_sel[:, :, 0])
    return out.reshape(b, p.q_heads, p.head_dim).to(q.dtype)


def dense_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
                                 kv_start: torch.Tensor | None = None,
                                 kv_end: torch.Tensor | None = None) -> torch.Tensor:
    """`dense_decode_attention` in PyTorch (the reference; any device and dtype, float64 included)."""
    check_dense(q, k_cache, v_cache, kv_start, kv_end)
    b, hq, dh = q.shape
    hkv, s = k_cache.shape[1:3]
    acc = torch.promote_types(q.dtype, torch.float32)
    pos = torch.arange(s, device=q.device)[None, :]
    valid = (pos >= (0 if kv_start is None else kv_start[:, None].long())) & \
        (pos < (s if kv_end is None else kv_end[:, None].long()))  # [B or 1, S]
    qg = q.reshape(b, hkv, hq // hkv, dh).to(acc)
    logits = torch.matmul(qg, k_cache.to(acc).transpose(-1, -2)) * scaling  # [B, Hkv, G, S]
    logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    v = v_cache.to(acc).masked_fill(~valid[:, None, :, None], 0.0)  # unwritten memory past kv_end may hold NaN
    return torch.matmul(probs, v).reshape(b, hq, dh).to(q.dtype)
