"""The Loki attention function, registered with Transformers' `AttentionInterface` under `ATTENTION_NAME`.

Per query row: rotate the query into the PCA basis of its KV head, score every visible key on the first `d`
principal dims, keep the top `k`, and run exact softmax attention (all D dims) over the kept keys only.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import transformers

from ..kernels.loki.prefill_naive import loki_prefill_attention_torch, masked_attention
from .layer import (APPROX_KEYS, DECODE_WORKSPACE, KV_BOUNDS, KV_HOST_LEN, ROTATED_FLAG, LokiLayer, on_mask,
                    visible_keys)

ATTENTION_NAME = "hf_patch_loki"
MODES = ("decode", "all")
GQA_SELECT = ("query", "group")


def loki_attention_dense(
    loki: LokiLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    keys_rotated: bool,
) -> torch.Tensor:
    """Loki for every query row, as a masked dense computation (teacher-forced forward, prefill in mode "all").

    query: [B, H_q, T, D]; key, value: [B, H_kv, S, D] (key rotated iff `keys_rotated`); visible: [B|1, 1, T, S].
    Returns [B, T, H_q, D]. The leading rows that `loki.sparse_from` leaves dense in every sequence (the prefix of
    a decode-equivalent pass) run as plain attention: only the rows after them pay for Loki.
    """
    b, _, t, _ = query.shape
    s = key.shape[2]
    first = 0 if loki.sparse_from is None else min(t, max(0, int(loki.sparse_from.min()) - (s - t)))
    if first > 0:
        q = loki.rotate_queries(query).flatten(1, 2) if keys_rotated else query
        head = masked_attention(q[:, :, :first], key, value, visible[:, :, :first], scaling)
        tail = loki_attention_dense(loki, query[:, :, first:], key, value, visible[:, :, first:], scaling,
                                    keys_rotated)
        return torch.cat([head, tail], dim=1)
    q_rot = loki.rotate_queries(query)  # [B, H_kv, G, T, D]
    d_max = int(loki.dims.max())
    k_approx = key[..., :d_max] if keys_rotated else loki.rotate_keys(key, d_max)
    keys_per_row = loki.keys_per_row(visible.expand(b, -1, -1, -1)[:, 0].sum(-1),
                                     torch.arange(t, device=query.device) + (s - t))
    q_exact = q_rot.flatten(1, 2) if keys_rotated else query
    return loki_prefill_attention_torch(q_exact, key, value, loki.approx_query(q_rot).flatten(1, 2), k_approx,
                                        keys_per_row, visible, group=loki.gqa_select == "group", scaling=scaling,
                                        sink=loki.policy.sink, recent=loki.policy.recent)


def decode_kv_start(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None | bool:
    """First visible key per sequence for a one-token step: int32 [B], None (all visible), or False when the
    visible keys are not one suffix of the cache (then the kernel's left-padding form does not apply). Every layer
    of a step gets the same mask object: the answer is kept on it."""
    if attention_mask is None:
        return None

    def compute() -> torch.Tensor | None | bool:
        vis = visible_keys(attention_mask, 1, kv_len, attention_mask.device)[:, 0, -1]  # [B, S]
        start = kv_len - vis.sum(-1)
        suffix = torch.arange(kv_len, device=vis.device)[None] >= start[:, None]
        return False if not torch.equal(vis, suffix) else (start.to(torch.int32) if bool(start.any()) else None)

    return on_mask(attention_mask, ("kv_start", kv_len), compute)


def loki_decode_step(loki: LokiLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One decode step through the decode op: query [B, H_q, 1, D], rotated key / value [B, H_kv, S, D] whose
    valid keys are [kv_start, kv_end) (int [B] on the device, None: 0 / S) -> [B, H_q, D]. The budget is the
    layer's: with bounds, each sequence's keys_per_row (computed on the device from kv_end - kv_start: no host
    sync, CUDA graphs replay it; k_tokens included) under the bound max_keys(S); without, what a row that sees
    all S keys keeps (the kernel calls them k_b and k); d, sink and recent are the layer's policy's. The kernel's scratch buffers are the cache's
    (`DECODE_WORKSPACE` on the keys)."""
    from ..kernels.loki import loki_decode_attention

    s = key.shape[2]
    policy = loki.policy
    k_max, keys_per_row = int(policy.keys_per_row(torch.tensor(s))), None
    if kv_start is not None or kv_end is not None:
        n = (s if kv_end is None else kv_end.to(torch.int64)) - (0 if kv_start is None else kv_start.to(torch.int64))
        k_max, keys_per_row = policy.max_keys(s), policy.keys_per_row(n)
    return loki_decode_attention(loki.rotate_queries(query).flatten(1, 3), key, value, d=loki.kernel_dims,
                                 k=k_max, k_b=keys_per_row, sink=policy.sink, recent=policy.recent, scaling=scaling, kv_start=kv_start, kv_end=kv_end,
                                 gqa_select=loki.gqa_select, k_approx=getattr(key, APPROX_KEYS, None),
                                 workspace=getattr(key, DECODE_WORKSPACE, None))


def _warn_dense_multirow(loki: LokiLayer) -> None:
    if not loki.warned:
        loki.warned = True
        warnings.warn(
            "Loki mode 'decode' attends densely to forwards of several tokens without a LokiCache (prefill, a "
            "teacher-forced evaluation, or generate(use_cache=False)): no row of this forward used Loki. Use "
            "mode='all', generate with the cache, or hf_patch.decode_rows(model, start) to score rows from "
            "`start` as generated tokens.", stacklevel=3)


def loki_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` entry: query [B, H_q, T, D], key/value [B, H_kv, S, D] -> ([B, T, H_q, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    loki: LokiLayer = module.hf_patch_loki
    keys_rotated = getattr(key, ROTATED_FLAG, False)
    if loki.require_loki_cache and not keys_rotated:
        raise RuntimeError(
            f"generate on a Loki-patched model (mode 'decode') ran layer {module.layer_idx} on a cache that is not a "
            "LokiCache, so its decode steps would silently leave Loki's fast path: transformers "
            f"{transformers.__version__} does not generate on the cache hf_patch hands it. Use a transformers "
            "release in hf-patch's tested range (README, 'Supported Transformers releases').")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    t = query.shape[2]
    if attention_mask is None and 1 < t < key.shape[2]:
        # no mask for several rows over more keys: a prefill into an empty preallocated cache (StaticCache), where
        # the mask is left to SDPA's is_causal (upper-left: row i sees keys 0..i); the slots past the rows hold no
        # token yet. Dropping them leaves plain causal attention over the T keys, as every path below reads None.
        key, value = key[:, :, :t], value[:, :, :t]
    multirow_dense = loki.mode == "decode" and t > 1 and loki.sparse_from is None
    bounds = getattr(key, KV_BOUNDS, None)  # device steps (CUDA graphs): the cache gives the valid range
    if t == 1 and keys_rotated and bounds is None:
        start = decode_kv_start(attention_mask, key.shape[2])  # False: the mask is no left padding (dense below)
        bounds = None if start is False else (start, None)
    if t == 1 and keys_rotated and bounds is not None:  # a decode step over each sequence's valid keys
        if loki.dense_step(getattr(key, KV_HOST_LEN, key.shape[2])):  # every key kept: exact attention
            from ..kernels.loki import dense_decode_attention

            q = loki.rotate_queries(query).flatten(1, 3)  # [B, H_q, D]
            return dense_decode_attention(q, key, value, scaling=scaling, kv_start=bounds[0], kv_end=bounds[1],
                                          workspace=getattr(key, DECODE_WORKSPACE, None))[:, None], None
        return loki_decode_step(loki, query, key, value, *bounds, scaling)[:, None], None
    if loki.dense or multirow_dense:  # exact attention; rotated keys need rotated queries
        if multirow_dense and not keys_rotated and not loki.dense:
            _warn_dense_multirow(loki)
        q = loki.rotate_queries(query).flatten(1, 2) if keys_rotated else query
        return sdpa_attention_forward(module, q, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.is_cuda or loki.prefill_kernels_on_cpu:  # mode "all": kernels where the mask is causal + padding
        from .prefill import loki_prefill_forward

        out = loki_prefill_forward(loki, query, key, value, attention_mask, scaling, keys_rotated)
        if out is not None:
            return out, None
    visible = visible_keys(attention_mask, t, key.shape[2], query.device)
    return loki_attention_dense(loki, query, key, value, visible, scaling, keys_rotated), None
