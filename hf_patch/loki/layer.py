"""One attention layer's Loki settings (`LokiLayer`), which keys each query row sees (and `on_mask`, which keeps
what is derived from a mask on the mask, for the other layers of the forward), and the names of the attributes
the Loki cache sets on the key tensors it publishes. Read by the attention function, the prefill glue
and the cache alike (none of them imports another for these)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .budget import Budget
from .selection import LokiRanking, SelectionPolicy

ROTATED_FLAG = "_loki_rotated"  # set on key tensors that the Loki cache already rotated into the basis
KV_BOUNDS = "_loki_kv_bounds"  # (kv_start, kv_end) int32 [B] on the device: keys of a fixed-capacity cache
KV_HOST_LEN = "_loki_kv_host_len"  # int: keys a fixed-capacity cache holds after this step, as the host counts them
APPROX_KEYS = "_loki_approx_keys"  # the published keys' narrow copy [B, H_kv, length, d'] (`LokiCache`)
DECODE_WORKSPACE = "_loki_decode_workspace"  # the decode kernels' scratch buffers (`DecodeWorkspace`) for these keys


@dataclass
class LokiLayer:
    """Loki settings of one attention layer, attached to its module as ``module.hf_patch_loki``.

    components: [H_kv, D, D] float32 basis (columns = principal directions); dims: int64 [H_kv], principal dims
    each KV head scores with (the allocated dims as the policy's ranking reads them: `SelectionPolicy.rank_dims`);
    policy: which keys each query row keeps (`SelectionPolicy`: budget, protection, ranking; a `Budget` stands for
    `LokiRanking` of it); mode: "decode" (full attention when
    several queries arrive at once, i.e. prefill; Loki for single-token steps) or "all" (Loki on every row);
    gqa_select: "query" (each query head picks its own tokens) or "group" (one pick per KV head, by the max over
    its query heads of the approximate scores); dense: the layer keeps full attention (`dense_layers`).
    sparse_from: int64 [B] or None, set only inside `decode_rows`: in a multi-row forward, the rows whose key
    index is below sparse_from[b] attend densely and the others with Loki, as if each were a generated token.
    require_loki_cache: set while a patched model's `generate` runs in mode "decode" (`hf_patch.loki.generate`):
    keys that did not come from a `LokiCache` are then an error, not a silent fall-back to the slow path.
    prefill_kernels_on_cpu: mode "all" runs the Triton prefill kernels on CPU tensors too (Triton's interpreter:
    tests and the smoke benchmark), not only on CUDA.
    """

    components: torch.Tensor
    dims: torch.Tensor
    policy: SelectionPolicy | Budget
    mode: str = "decode"
    gqa_select: str = "query"
    dense: bool = False
    sparse_from: torch.Tensor | None = None
    require_loki_cache: bool = False
    prefill_kernels_on_cpu: bool = False
    warned: bool = field(default=False, repr=False)
    _on_device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.policy, Budget):
            self.policy = LokiRanking(self.policy)
        self.dims = self.policy.rank_dims(self.dims, self.components.shape[-1])

    @property
    def budget(self) -> Budget:
        """Keys kept per query row (the policy's `Budget`)."""
        return self.policy.budget

    def keys_per_row(self, n_visible: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """int64 [B, T] keys kept by each query row. n_visible: int [B, T] keys each row sees; rows: int [T], each
        row's key index (its own position in the cache). Mode "all" reads the paper rule's window S per sequence
        as the keys its last row sees; under `decode_rows` each sparse row is a decode step (S = what it sees)
        and rows before sparse_from keep every key."""
        if self.sparse_from is None:
            return self.policy.keys_per_row(n_visible, n_visible[:, -1:])
        n = n_visible.to(torch.int64)
        dense_row = rows.to(n.device)[None, :] < self.sparse_from.to(n.device)[:, None]
        return torch.where(dense_row, n, self.policy.keys_per_row(n))

    def dense_step(self, n_keys: int) -> bool:
        """Whether a decode step over `n_keys` cached keys keeps every key (a dense layer, or a budget that keeps
        all of that many): it then attends densely, nothing scored or selected."""
        return self.dense or n_keys <= self.policy.dense_up_to

    @functools.cached_property
    def kernel_dims(self) -> int | tuple[int, ...]:
        """d as the decode kernel takes it: one int, or one int per KV head (computed once, no device sync later)."""
        dims = tuple(int(x) for x in self.dims)
        return dims[0] if len(set(dims)) == 1 else dims

    @property
    def num_kv_heads(self) -> int:
        return self.components.shape[0]

    def basis(self, device: torch.device) -> torch.Tensor:
        """The basis on `device` (float32), moved once per device."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.components.to(device=device, dtype=torch.float32)
        return self._on_device[key]

    def rotate_keys(self, keys: torch.Tensor, dims: int | None = None) -> torch.Tensor:
        """[B, H_kv, T, D] -> [B, H_kv, T, dims or D] in the basis (computed in float32, returned in keys.dtype)."""
        p = self.basis(keys.device)
        if dims is not None:
            p = p[..., :dims]
        return torch.matmul(keys.float(), p.unsqueeze(0)).to(keys.dtype)

    def rotate_queries(self, query: torch.Tensor) -> torch.Tensor:
        """[B, H_q, T, D] -> [B, H_kv, G, T, D] in the basis of each query's KV head."""
        b, hq, t, d = query.shape
        q = query.float().view(b, self.num_kv_heads, hq // self.num_kv_heads, t, d)
        return torch.matmul(q, self.basis(query.device)[None, :, None]).to(query.dtype)

    def approx_query(self, q_rot: torch.Tensor) -> torch.Tensor:
        """Keep each KV head's first d_j dims of rotated queries [B, H_kv, G, T, D] -> [B, H_kv, G, T, max d]."""
        d_max = int(self.dims.max())
        q = q_rot[..., :d_max]
        if int(self.dims.min()) == d_max:
            return q
        keep = torch.arange(d_max, device=q.device) < self.dims.to(q.device)[:, None]  # [H_kv, max d]
        return q * keep[None, :, None, None, :].to(q.dtype)


def visible_keys(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, T_q, S]: which keys each query row may attend to (None means plain causal)."""
    if attention_mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask


_ON_MASK = "_loki_derived"  # set on an attention mask: {key: answer} of the values derived from it


def on_mask(mask: torch.Tensor | None, key: tuple, compute: Callable[[], object]) -> object:
    """compute() once per mask object and key (every layer of a forward gets the same mask); no mask: compute()."""
    if mask is None:
        return compute()
    cache = getattr(mask, _ON_MASK, None)
    if cache is None:
        cache = {}
        setattr(mask, _ON_MASK, cache)
    if key not in cache:
        cache[key] = compute()
    return cache[key]
