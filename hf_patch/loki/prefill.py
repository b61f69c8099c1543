"""Loki on many query rows at once through the Triton prefill kernels (`hf_patch.kernels.loki.prefill`): the glue
between one attention call of a model and the op, which takes prepared tensors only.

Per call: the key range each sequence sees (from Transformers' mask; kept on the mask object, which every layer
of a forward shares), the keys each row keeps (`LokiLayer.keys_per_row`, the one budget formula), the approximate
queries and keys (the same tensors `loki_attention_dense` scores with, hence the same kept sets), then the op.
"""
from __future__ import annotations

import torch

from ..kernels.loki.prefill import MAX_HEAD_DIM, TRITON_DTYPES, Ranges, approx_width, loki_prefill_attention
from .layer import LokiLayer, on_mask, visible_keys

def _ranges_of(attention_mask: torch.Tensor, q_len: int, kv_len: int, batch: int) -> Ranges | bool:
    """`key_ranges` computed: compares the whole visible mask [B', 1, T, S] on the device (one host sync)."""
    vis = visible_keys(attention_mask, q_len, kv_len, attention_mask.device)
    if not (vis.dim() == 4 and vis.shape[1] == 1 and vis.shape[0] in (1, batch) and vis.shape[2:] == (q_len, kv_len)):
        return False
    last = vis[:, 0, -1]  # [B', S]: the last row sees every key of its range
    n = last.sum(-1)
    start = torch.where(n > 0, last.to(torch.int8).argmax(-1), 0)
    end = start + n
    pos = torch.arange(kv_len, device=vis.device)
    rows = torch.arange(q_len, device=vis.device)[:, None] + (kv_len - q_len)
    expect = (pos >= start[:, None, None]) & (pos < end[:, None, None]) & (pos <= rows)  # [B', T, S]
    if not torch.equal(vis[:, 0], expect):
        return False
    return tuple(x.to(torch.int32).expand(batch).contiguous() for x in (start, end))


def key_ranges(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> Ranges | bool:
    """(start, end) int32 [B] such that row t sees keys start_b <= j < end_b with j <= t + kv_len - q_len; None
    for plain causal (mask None); False when the visible mask has another form (sliding window, holes, ...).
    The answer is kept on the mask: the other layers of the forward reuse it."""
    if attention_mask is None:
        return None
    return on_mask(attention_mask, ("ranges", q_len, kv_len, batch),
                    lambda: _ranges_of(attention_mask, q_len, kv_len, batch))


def visible_counts(ranges: Ranges, batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """int64 [B, T]: how many keys each query row sees (row t is key index t + kv_len - q_len)."""
    last = torch.arange(q_len, device=device)[None, :] + (kv_len - q_len)  # [1, T]
    if ranges is None:
        return (last + 1).expand(batch, q_len)
    start, end = (x.to(torch.int64)[:, None] for x in ranges)
    return (torch.minimum(last, end - 1) - start + 1).clamp_min(0)


def keys_per_row(loki: LokiLayer, attention_mask: torch.Tensor | None, ranges: Ranges, batch: int, q_len: int,
                 kv_len: int, device: torch.device) -> torch.Tensor:
    """int32 [B, T] keys kept by each query row (`LokiLayer.keys_per_row` of the keys it sees); kept on the mask for
    the layers of the forward that share the budget and `decode_rows`' start."""
    def compute() -> tuple[torch.Tensor | None, torch.Tensor]:
        n = visible_counts(ranges, batch, q_len, kv_len, device)
        rows = torch.arange(q_len, device=device) + (kv_len - q_len)
        return loki.sparse_from, loki.keys_per_row(n, rows).to(torch.int32).contiguous()

    # the entry holds sparse_from itself: its id cannot name another tensor while the entry lives
    key = ("keys_per_row", q_len, kv_len, batch, loki.budget, id(loki.sparse_from))
    return on_mask(attention_mask, key, compute)[1]


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., w] -> contiguous [..., width] with zeros past w."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()


def prepare(loki: LokiLayer, query: torch.Tensor, key: torch.Tensor,
            keys_rotated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's (q [B, Hq, T, D], qa [B, Hq, T, DP], ka [B, Hkv, S, DP]) from query [B, Hq, T, D] and key
    [B, Hkv, S, D] (rotated iff `keys_rotated`): q rotated when the keys are; qa / ka the first d dims of the
    rotated queries / keys as `loki_attention_dense` scores them, zero-padded to DP = approx_width(max d)."""
    q_rot = loki.rotate_queries(query)  # [B, H_kv, G, T, D]
    d_max = int(loki.dims.max())
    dp = approx_width(d_max)
    qa = _padded(loki.approx_query(q_rot).flatten(1, 2), dp)
    ka = _padded(key[..., :d_max] if keys_rotated else loki.rotate_keys(key, d_max), dp)
    q = q_rot.flatten(1, 2) if keys_rotated else query
    return (q if q.stride(-1) == 1 else q.contiguous()), qa, ka


def loki_prefill_forward(loki: LokiLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float,
                         keys_rotated: bool) -> torch.Tensor | None:
    """The kernel path of Loki's attention function for query [B, Hq, T, D], key/value [B, Hkv, S, D]:
    [B, T, Hq, D], or None when it does not apply (dtype, head dim, a visible mask that is not causal + one key
    range per sequence); the caller then runs the PyTorch path."""
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in TRITON_DTYPES \
            or query.shape[-1] > MAX_HEAD_DIM:
        return None
    b, _, t, _ = query.shape
    s = key.shape[2]
    ranges = key_ranges(attention_mask, t, s, b)
    if ranges is False:
        return None
    kept = keys_per_row(loki, attention_mask, ranges, b, t, s, query.device)
    q, qa, ka = prepare(loki, query, key, keys_rotated)
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    return loki_prefill_attention(q, key, value, qa, ka, kept, ranges, group=loki.gqa_select == "group",
                                  scaling=scaling, sink=loki.policy.sink, recent=loki.policy.recent)
