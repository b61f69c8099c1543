"""A KV cache that stores keys already rotated into the Loki basis, in buffers that grow in place.

Appending a token writes into preallocated storage and returns views of the filled part: a decode step never
copies the cache (the buffers grow geometrically, so a sequence of S tokens costs O(log S) reallocations).
Beside the rotated keys it keeps, by default, a contiguous copy of their first d' dims (d' = the layer's largest
d, rounded up to a multiple of 8): the decode kernel's approximate scores read it at full bandwidth instead of
64-byte pieces of each key row. It costs d'/D of the key memory (d_frac = 0.25: +12.5% of the keys, +6.25% of
the KV cache); `LokiCache(model, approx_keys=False)` leaves it out.

For steps replayed as CUDA graphs (`hf_patch.loki.cuda_graph`) the cache also runs in "device steps" mode: the
write position and the valid range of each sequence live in device tensors (`DeviceSteps`), and `update` returns
the whole capacity with those bounds attached, so one captured step serves every cache length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kernels.loki import DecodeWorkspace
from .arch import loki_layers
from .layer import APPROX_KEYS, DECODE_WORKSPACE, KV_BOUNDS, KV_HOST_LEN, ROTATED_FLAG, LokiLayer

GROWTH = 256  # capacity is kept a multiple of this many tokens


@dataclass
class DeviceSteps:
    """Device-side state of one-token steps on a fixed-capacity cache (what a CUDA graph reads each replay).

    position: int64 [1], where the step's token is written; kv_start / kv_end: int32 [B], the valid keys
    [kv_start[b], kv_end[b]) of each sequence once the token is in (kv_end = position + 1); workspace: the decode
    kernels' scratch buffers for these steps (the graph runner's: its graph replays into them).
    """

    position: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    workspace: DecodeWorkspace


class LokiCacheLayer(CacheLayerMixin):
    """One layer: rotated keys and values in [B, H_kv, capacity, D] buffers, and (approx_keys) a copy of the first
    d' rotated dims in a [B, H_kv, capacity, d'] buffer; `keys`/`values` view [:, :, :length], and
    `getattr(keys, APPROX_KEYS)` the narrow copy's [:, :, :length] (absent without one); `getattr(keys,
    DECODE_WORKSPACE)` is the cache's `workspace`, the decode kernels' scratch buffers (shared by its layers)."""

    is_sliding = False
    is_croppable = True

    def __init__(self, loki: LokiLayer, workspace: DecodeWorkspace, capacity: int = 0, approx_keys: bool = True):
        super().__init__()
        self.loki = loki
        self.workspace = workspace
        self.capacity_hint = capacity
        self.approx_keys = approx_keys
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._ka: torch.Tensor | None = None
        self.steps: DeviceSteps | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        head_dim = key_states.shape[-1]
        self._k = key_states.new_empty((*key_states.shape[:2], 0, head_dim))
        self._v = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        width = min(head_dim, -(-int(self.loki.dims.max()) // 8) * 8)  # 16-byte rows (bf16) for vector loads
        if self.approx_keys and width < head_dim:
            self._ka = key_states.new_empty((*key_states.shape[:2], 0, width))
        self.is_initialized = True
        self._reserve(max(self.capacity_hint, key_states.shape[-2]))

    def _buffers(self) -> list[str]:
        return ["_k", "_v"] + (["_ka"] if self._ka is not None else [])

    def _reserve(self, needed: int) -> None:
        capacity = self._k.shape[2]
        if needed <= capacity:
            return
        new = max(needed, capacity + capacity // 2)
        new = -(-new // GROWTH) * GROWTH
        for name in self._buffers():
            old = getattr(self, name)
            # zeros past the filled part: graphed steps read the whole capacity, and a dense layer's exact
            # attention weighs masked positions by 0, which must not meet NaN in never-written memory
            buf = old.new_zeros((*old.shape[:2], new, old.shape[-1]))
            buf[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, buf)

    def _publish(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._k[:, :, : self.length]
        setattr(keys, ROTATED_FLAG, True)
        setattr(keys, DECODE_WORKSPACE, self.workspace)
        if self._ka is not None:
            setattr(keys, APPROX_KEYS, self._ka[:, :, : self.length])
        self._keys, self._values, self._views_at = keys, self._v[:, :, : self.length], self.length
        return self._keys, self._values

    # `keys` / `values`: views of the filled part, remade on access once device steps have moved `length` on
    # (`LokiCache.advance` only counts, which keeps a graphed step's host work free of per-layer view making).
    @property
    def keys(self) -> torch.Tensor | None:
        self._refresh_views()
        return self._keys

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ sets None
        self._keys, self._views_at = value, -1

    @property
    def values(self) -> torch.Tensor | None:
        self._refresh_views()
        return self._values

    @values.setter
    def values(self, value) -> None:
        self._values, self._views_at = value, -1

    def _refresh_views(self) -> None:
        if self.is_initialized and self._views_at != self.length:
            self._publish()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H_kv, T, D] keys (rotated here) and values; return views of everything cached."""
        if self.steps is not None:
            return self._update_on_device(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self._reserve(self.length + t)
        rotated = self.loki.rotate_keys(key_states).to(self.dtype)
        self._k[:, :, self.length : self.length + t] = rotated
        if self._ka is not None:
            self._ka[:, :, self.length : self.length + t] = rotated[..., : self._ka.shape[-1]]
        self._v[:, :, self.length : self.length + t] = value_states.to(self.dtype)
        self.length += t
        return self._publish()

    def _update_on_device(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Device steps: write one token per sequence at `steps.position` (no host state read or changed) and
        return the whole [B, H_kv, capacity, D] buffers, tagged with the valid bounds (`KV_BOUNDS`)."""
        if key_states.shape[-2] != 1:
            raise ValueError(f"device steps take one token per sequence, got {key_states.shape[-2]}")
        rotated = self.loki.rotate_keys(key_states).to(self.dtype)
        pos = self.steps.position
        self._k.index_copy_(2, pos, rotated)
        if self._ka is not None:
            self._ka.index_copy_(2, pos, rotated[..., : self._ka.shape[-1]])
        self._v.index_copy_(2, pos, value_states.to(self.dtype))
        keys, values = self._k[:, :, :], self._v[:, :, :]
        setattr(keys, ROTATED_FLAG, True)
        setattr(keys, KV_BOUNDS, (self.steps.kv_start, self.steps.kv_end))
        setattr(keys, KV_HOST_LEN, self.length + 1)  # a graph replays only while `dense_steps` gives the same
        setattr(keys, DECODE_WORKSPACE, self.steps.workspace)
        if self._ka is not None:
            setattr(keys, APPROX_KEYS, self._ka)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._publish()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._publish()

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            for name in self._buffers():
                setattr(self, name, fn(getattr(self, name)))
            self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def offload(self):
        raise NotImplementedError("the Loki cache does not support offloading")

    prefetch = offload


class LokiCache(Cache):
    """Cache for a model patched with Loki: one `LokiCacheLayer` per attention layer.

    A patched model's `generate` runs on one it builds (`hf_patch.loki.generate`); pass one yourself as
    `cache=LokiCache(model)` (`past_key_values=` before transformers 5.25) for manual decoding loops. `capacity`
    preallocates that many tokens per layer. `approx_keys` keeps the narrow copy of the first d' rotated key dims
    that the decode kernel scores from (+d'/D of the key memory). `workspace` holds the decode kernels' scratch
    buffers between steps (every layer's calls share it).
    """

    def __init__(self, model: torch.nn.Module, capacity: int = 0, approx_keys: bool = True):
        workspace = DecodeWorkspace()
        super().__init__(layers=[LokiCacheLayer(layer, workspace, capacity, approx_keys)
                                 for layer in loki_layers(model)])
        self.workspace = workspace

    def buffers_key(self) -> tuple[int, ...]:
        """Addresses of every layer's storage: a CUDA graph captured on this cache is valid while they hold."""
        return tuple(getattr(layer, name).data_ptr() for layer in self.layers if layer.is_initialized
                     for name in layer._buffers())

    def dense_steps(self, length: int) -> tuple[bool, ...]:
        """Per layer, whether a decode step over `length` cached keys attends densely (its budget keeps every
        key, or the layer is dense): a captured step serves only steps with the same answer."""
        return tuple(layer.loki.dense_step(length) for layer in self.layers)

    def capacity(self) -> int:
        """Tokens every layer can hold without reallocating."""
        return min(layer._k.shape[2] if layer.is_initialized else 0 for layer in self.layers)

    def set_device_steps(self, steps: DeviceSteps | None) -> None:
        """Enter (steps) or leave (None) device-steps mode on every layer (see `DeviceSteps`)."""
        for layer in self.layers:
            layer.steps = steps

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens in every layer (reallocating, growth included, where short)."""
        for layer in self.layers:
            layer._reserve(length)

    def advance(self, tokens: int) -> None:
        """Host bookkeeping after `tokens` device steps wrote into every layer: count them as cached."""
        for layer in self.layers:
            layer.length += tokens
