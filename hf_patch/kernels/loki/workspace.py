"""Scratch memory of the Triton decode path, owned by the object that makes the calls (a `LokiCache` for its eager
steps, a graph runner for the steps its CUDA graph replays) and passed to each call."""
from __future__ import annotations

import torch
import triton


class ScratchBuffers:
    """Scratch buffers of the Triton path for one (device, stream), kept between calls: 2-D, rows padded
    (kernels take the row stride), grown by half again when too small. Counters are allocated zeroed and the
    kernels reset them after use."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] < cols:
            if buf is not None:
                rows, cols = max(rows, buf.shape[0]), max(cols, buf.shape[1] * 3 // 2)
            shape = (rows, triton.cdiv(cols, 64) * 64)
            buf = torch.zeros(shape, dtype=dtype, device=self.device) if zeros else \
                torch.empty(shape, dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf


class DecodeWorkspace:
    """The scratch buffers that Triton decode calls keep between calls: one `ScratchBuffers` per (device, stream),
    so calls on different streams never share buffers; calls on one stream must not overlap in time (stream order
    guarantees this for ordinary use). A CUDA graph that captured calls bakes in the addresses of the buffers they
    used: whoever replays it keeps this workspace with it."""

    def __init__(self):
        self.sets: dict[tuple, ScratchBuffers] = {}

    def on(self, device: torch.device) -> ScratchBuffers:
        """The buffers for `device` and its current stream."""
        stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
        buffers = self.sets.get((device, stream))
        if buffers is None:
            buffers = self.sets[(device, stream)] = ScratchBuffers(device)
        return buffers
