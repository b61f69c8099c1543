"""The arguments of a decode step, validated: `check_decode` (the Loki step) and `check_dense` (the dense step)
raise ValueError/TypeError saying what to fix, before any kernel runs; `DecodeProblem` holds what the stages read."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GQA_SELECT = ("query", "group")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class DecodeProblem:
    """Validated arguments: sizes, the per-head dims and the budget."""

    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    d_max: int
    dims: torch.Tensor | None  # int [Hkv] when heads use different d, else None (all use d_max)
    group: bool
    k: int  # keys kept per row (k_b None), else the bound of k_b
    k_b: torch.Tensor | None  # int32 [B] keys kept per sequence, on q's device
    sink: int
    recent: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def rows_per_batch(self) -> int:
        """Selection rows per sequence: one per KV head ("group") or per query head ("query")."""
        return self.kv_heads if self.group else self.q_heads

    @property
    def protect(self) -> bool:
        """Whether some positions are kept whatever their scores (sink or recent)."""
        return self.sink > 0 or self.recent > 0


def check_int_tensor(name: str, x: torch.Tensor | None, b: int, device: torch.device) -> None:
    """kv_start / kv_end / k_b must be int32/int64 tensors [B] on q's device (their values stay on the device)."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.shape != (b,) or x.dtype not in (torch.int32, torch.int64):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an int32/int64 tensor [B={b}], got {got}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, q on {device}: move it to q's device")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_tensors(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Shapes, dtypes, devices and strides of q [B, Hq, D], k_cache and v_cache [B, Hkv, S, D]."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [B, Hkv, S, D]; got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    b, hq, dh = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[0] != b or k_cache.shape[-1] != dh:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k_cache and v_cache must share one dtype of {_DTYPES}; got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError("q, k_cache and v_cache must be on one device")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim (stride(-1) == 1)")


def _check_dims(d, hkv: int, dh: int) -> tuple[int, int, tuple[int, ...] | None]:
    """(min d, max d, per-head dims or None) of an int or ints per KV head (tuple or int tensor [Hkv])."""
    if isinstance(d, torch.Tensor):
        if d.shape != (hkv,) or d.dtype.is_floating_point or d.dtype == torch.bool:
            raise ValueError(f"per-head d must be an int tensor [Hkv={hkv}], got {d.dtype} {tuple(d.shape)}")
        d = tuple(d.tolist())  # a host sync when d is on the GPU: keep it on the CPU or pass a tuple of ints
    if isinstance(d, (tuple, list)):
        if len(d) != hkv or not all(_is_int(x) for x in d):
            raise ValueError(f"per-head d must hold {hkv} ints (one per KV head), got {d!r}")
        d_min, d_max = min(d), max(d)
    elif _is_int(d):
        d_min = d_max = d
    else:
        raise TypeError(f"d must be an int, or ints per KV head (tuple or int tensor [Hkv]), got {type(d).__name__}")
    if not 1 <= d_min <= d_max <= dh:
        raise ValueError(f"d must lie in [1, D={dh}], got values in [{d_min}, {d_max}]")
    return d_min, d_max, tuple(d) if d_min != d_max else None


def _check_budget(k, k_b, sink, recent, seq: int, bounded: bool) -> None:
    """k, k_b, sink and recent (see `loki_decode_attention`); the values of k_b are the caller's to keep."""
    if not _is_int(k):
        raise TypeError(f"k must be an int (keys kept per row, or the bound of k_b), got {type(k).__name__}")
    for name, value in (("sink", sink), ("recent", recent)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (positions always kept), got {value!r}")
    if k_b is not None:
        if not 0 <= k <= seq:
            raise ValueError(f"k (the bound of k_b) must lie in [0, S={seq}], got {k}")
        return
    if bounded:
        raise ValueError("with kv_start/kv_end, pass k_b (int tensor [B]: keys kept per sequence, at most "
                         "min(k, kv_end - kv_start)); k alone means every row sees all S keys")
    if not 1 <= k <= seq:
        raise ValueError(f"k must lie in [1, S={seq}] when k_b is None (every row keeps k of its S keys), got {k}")
    if k < min(seq, sink + recent):
        raise ValueError(f"k ({k}) must be at least min(S, sink + recent) = {min(seq, sink + recent)}: the protected "
                         "positions count inside k")


def check_decode(q, k_cache, v_cache, d, k, k_b, sink, recent, kv_start, kv_end, gqa_select, k_approx) -> DecodeProblem:
    """Validate the arguments of `loki_decode_attention`; raise ValueError/TypeError saying what to fix."""
    check_tensors(q, k_cache, v_cache)
    b, hq, dh = q.shape
    _, hkv, s, _ = k_cache.shape
    if gqa_select not in GQA_SELECT:
        raise ValueError(f"gqa_select must be one of {GQA_SELECT}, got {gqa_select!r}")
    for name, x in (("kv_start", kv_start), ("kv_end", kv_end), ("k_b", k_b)):
        check_int_tensor(name, x, b, q.device)
    _check_budget(k, k_b, sink, recent, s, kv_start is not None or kv_end is not None)
    _, d_max, per_head = _check_dims(d, hkv, dh)
    if k_approx is not None and (k_approx.dim() != 4 or k_approx.shape[:3] != k_cache.shape[:3]
                                 or not d_max <= k_approx.shape[-1] <= dh or k_approx.dtype != q.dtype
                                 or k_approx.device != q.device or k_approx.stride(-1) != 1):
        raise ValueError(f"k_approx must be [B, Hkv, S, d'] with max d = {d_max} <= d' <= D, k_cache's "
                         f"{tuple(k_cache.shape[:3])}, dtype {q.dtype}, device {q.device} and stride(-1) == 1; "
                         f"got {k_approx.dtype} {tuple(k_approx.shape)} on {k_approx.device}")
    dims = _dims_on(q.device, per_head) if per_head is not None else None
    k_b = k_b.to(torch.int32) if k_b is not None else None  # on the device: no host sync
    return DecodeProblem(b, hq, hkv, s, dh, d_max, dims, gqa_select == "group", k, k_b, sink, recent)


@functools.lru_cache(maxsize=64)
def _dims_on(device: torch.device, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-head dims as int32 [Hkv] on `device`, copied once (no host-to-device copy per decode step)."""
    return torch.tensor(dims, dtype=torch.int32, device=device)


def check_dense(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor | None,
                kv_end: torch.Tensor | None) -> None:
    """Validate the arguments of `dense_decode_attention`."""
    check_tensors(q, k_cache, v_cache)
    for name, x in (("kv_start", kv_start), ("kv_end", kv_end)):
        check_int_tensor(name, x, q.shape[0], q.device)
