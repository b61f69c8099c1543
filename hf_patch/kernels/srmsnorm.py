"""TransNormer's parameter-free SRMSNorm ``x / sqrt(mean(x^2) + eps)``, optionally gated (``gate * norm(x)``).

On CUDA (large inputs) one Triton kernel per direction does the float32 maths and writes the result straight in the
dtype its consumer uses, which removes the dtype copies that `F.rms_norm` under autocast implies (autocast runs
`rms_norm` in float32: a bf16 input is copied to float32, the float32 output copied back to bf16 by the next
`nn.Linear`, and the same again for the gradients). The numbers are those of the PyTorch ops up to summation order:
float32 maths, one rounding to the output dtype. Elsewhere (CPU, float64, decoding-sized inputs) the PyTorch ops run.

Output dtype: under autocast, the autocast dtype where the caller says so (``autocast_output``: the norm feeds a
linear layer, which would cast to it anyway), else float32 (what `F.rms_norm` gives under autocast); without
autocast, the inputs' promoted dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MIN_TRITON_NUMEL = 1 << 16  # below this (decoding steps) the PyTorch ops launch faster than a Triton kernel
BACKENDS = ("auto", "triton", "torch")


@triton.jit
def _srms_fwd_kernel(X, G, Y, stride_x, stride_g, stride_y, n_cols, eps,
                     BLOCK: tl.constexpr, HAS_GATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    if HAS_GATE:
        y = y * tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _srms_bwd_kernel(DY, X, G, DX, DG, stride_dy, stride_x, stride_g, stride_dx, stride_dg, n_cols, eps,
                     BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, WANT_DG: tl.constexpr):
    """dn = dy * gate (or dy); dx = r (dn - n mean(dn n)) with n = x r, r = rsqrt(mean(x^2) + eps); dgate = dy n."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    n = x * r
    if HAS_GATE:
        if WANT_DG:
            tl.store(DG + row * stride_dg + cols, (dy * n).to(DG.dtype.element_ty), mask=mask)
        dy = dy * tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    dx = r * (dy - n * (tl.sum(dy * n, 0) / n_cols))
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, cols] with unit column stride (a view when possible, e.g. a slice of a fused projection)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(kernel, rows: int, cols: int, *args, **consts) -> None:
    if rows == 0:
        return
    block = triton.next_power_of_2(cols)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    kernel[(rows,)](*args, cols, consts.pop("eps"), BLOCK=block, num_warps=warps, **consts)


class _SRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, eps, out_dtype):
        x2 = _rows(x)
        g2 = None if gate is None else _rows(gate)
        y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
        _launch(_srms_fwd_kernel, x2.shape[0], x2.shape[1], x2, x2 if g2 is None else g2, y,
                x2.stride(0), 0 if g2 is None else g2.stride(0), y.stride(0), eps=eps, HAS_GATE=g2 is not None)
        ctx.save_for_backward(x2, g2)
        ctx.eps, ctx.shapes = eps, (x.shape, None if gate is None else gate.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, g2 = ctx.saved_tensors
        dy2 = _rows(dy)
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        want_dg = g2 is not None and ctx.needs_input_grad[1]
        dg = torch.empty_like(g2, memory_format=torch.contiguous_format) if want_dg else None
        _launch(_srms_bwd_kernel, x2.shape[0], x2.shape[1], dy2, x2, x2 if g2 is None else g2, dx,
                dx if dg is None else dg, dy2.stride(0), x2.stride(0), 0 if g2 is None else g2.stride(0),
                dx.stride(0), 0 if dg is None else dg.stride(0), eps=ctx.eps, HAS_GATE=g2 is not None,
                WANT_DG=want_dg)
        x_shape, g_shape = ctx.shapes
        return dx.view(x_shape), None if dg is None else dg.view(g_shape), None, None


def srms_norm_out_dtype(x: torch.Tensor, gate: torch.Tensor | None, autocast_output: bool) -> torch.dtype:
    """The dtype ``srms_norm`` returns (see the module docstring)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in _FLOATS:
        return torch.get_autocast_dtype(device_type) if autocast_output else torch.float32
    return x.dtype if gate is None else torch.promote_types(x.dtype, gate.dtype)


def srms_norm(x: torch.Tensor, eps: float, gate: torch.Tensor | None = None, autocast_output: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """``(gate *) x / sqrt(mean(x^2, -1) + eps)``; ``backend``: "auto" (Triton for large CUDA float16/bfloat16/float32
    inputs, else PyTorch), "triton" (any device Triton runs on: the tests use its CPU interpreter) or "torch"."""
    out_dtype = srms_norm_out_dtype(x, gate, autocast_output)
    if backend == "auto":
        dtypes_ok = x.dtype in _FLOATS and (gate is None or gate.dtype in _FLOATS)
        backend = "triton" if x.is_cuda and dtypes_ok and x.numel() >= MIN_TRITON_NUMEL else "torch"
    if backend == "triton":
        return _SRMSNormFunction.apply(x, gate, eps, out_dtype)
    if backend != "torch":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    y = F.rms_norm(x, (x.shape[-1],), eps=eps)
    if gate is not None:
        y = gate * y
    return y.to(out_dtype)
