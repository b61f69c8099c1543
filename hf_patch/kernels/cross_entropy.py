"""Fused linear + cross entropy: ``mean CE(h @ W^T (+ b), labels)`` without [tokens, vocab] logits or a recompute.

Tokens are processed in chunks. Per chunk: the logits in the compute dtype through one matmul; one pass of a Triton
kernel per row computes the row's logsumexp and loss (float32 math) and overwrites the logits, in place, with
``d loss / d logits = (softmax - onehot) / n_valid``; then ``grad_h = G @ W`` and ``grad_W += G^T @ h`` (float32
accumulator). So the forward already holds every gradient and the backward only scales them by ``grad_output``:
three matmuls per token instead of the four of a checkpointed chunked loss, and no float32 logits copies.

``fused_linear_cross_entropy``: flat ``[N, C]`` hidden states; ``causal_lm_loss``: ``[B, T, C]`` with the
next-token shift; ``linear_cross_entropy_reference``: the same loss written with ``F.cross_entropy`` (chunked,
autograd). The Triton kernel runs on CUDA (or anywhere with ``backend="triton"``, e.g. Triton's CPU interpreter in
the tests); float64 and CPU tensors take a PyTorch version of the same per-chunk step.

Conventions: labels equal to ``ignore_index`` (-100) count for nothing; the mean is over the other tokens; if there
are none, the loss and all gradients are 0 (``F.cross_entropy`` would give NaN). Under autocast the matmuls run in
the autocast dtype (like ``nn.Linear``), the loss is float32 and each gradient comes back in its input's dtype
(float32 master weights get float32 grads). A weight that is also the input embedding (tied) simply receives this
gradient next to the embedding's own, as autograd accumulates both into ``.grad``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

IGNORE_INDEX = -100
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _ce_rows_kernel(LOGITS, stride_row, LABELS, LOSS, SCALE, n_cols, ignore_index,
                    BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """One row: ``LOSS[row] = logsumexp(x) - x[label]`` and, with WRITE_GRAD, ``x <- (softmax(x) - onehot) * SCALE``
    in place (float32 math, stored in the logits' dtype). Ignored rows get loss 0 and a zero gradient."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(ptr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(LOGITS.dtype.element_ty),
                         mask=cols < n_cols)
    else:
        m = float("-inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        in_range = (label >= 0) & (label < n_cols)
        x_label = tl.load(ptr + label, mask=in_range, other=0.0).to(tl.float32)
        tl.store(LOSS + row, lse - x_label)
        if WRITE_GRAD:
            scale = tl.load(SCALE)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                x = tl.load(ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(cols == label, g - 1.0, g) * scale
                tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=cols < n_cols)


def _ce_rows_triton(logits, labels, loss, scale, write_grad: bool, block: int | None) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = block or min(16384, triton.next_power_of_2(vocab))  # 49,152 = 3 x 16,384: no masked lanes
    # sm_90, bf16, Triton 3.9 (cuobjdump): 16k x 32 warps needs 44 registers a thread, 16k x 16 warps 128 (one
    # program per SM), 8k x 16 warps 65, 4k x 8 warps 55; none spills.
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 32
    _ce_rows_kernel[(rows,)](logits, logits.stride(0), labels, loss, scale, vocab, IGNORE_INDEX,
                             BLOCK=block, WRITE_GRAD=write_grad, num_warps=warps)


def _ce_rows_torch(logits, labels, loss, scale, write_grad: bool, block: int | None = None) -> None:
    """The kernel's step in PyTorch ops (float32 math, float64 for float64 logits)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)[:, None]
    lse = torch.logsumexp(x, dim=-1)
    loss.copy_(torch.where(valid, lse - x.gather(1, target)[:, 0], 0.0))
    if write_grad:
        grad = torch.exp(x - lse[:, None])
        grad.scatter_add_(1, target, torch.full_like(lse[:, None], -1.0))
        logits.copy_(grad * (valid.to(x.dtype) * scale.to(x.dtype))[:, None])


_OUT_DTYPE_ADDMM: dict[torch.device, bool] = {}


def _addmm_out_dtype_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` takes bf16 inputs here and is right (torch >= 2.8
    on CUDA); checked once per device on a small product."""
    if device not in _OUT_DTYPE_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                a = (torch.arange(64 * 32, device=device).view(64, 32) % 7 - 3).bfloat16()  # no RNG draws
                b = (torch.arange(32 * 48, device=device).view(32, 48) % 5 - 2).bfloat16()
                acc = torch.ones(64, 48, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-3, atol=1e-3)
            except (RuntimeError, TypeError):
                ok = False
        _OUT_DTYPE_ADDMM[device] = ok
    return _OUT_DTYPE_ADDMM[device]


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32/float64 and ``a, b`` possibly in a lower precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _addmm_out_dtype_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _default_chunk(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: a power of two with about 1 GiB of logits (at least 1024 tokens)."""
    fits = max(1024, (2**30) // (vocab * dtype.itemsize))
    return min(rows, 1 << (fits.bit_length() - 1)) if rows else 1


def _fused_pass(h, weight, bias, labels, chunk: int, step, want_h: bool, want_w: bool, want_b: bool):
    """The chunk loop: loss (float32/64 scalar) and the gradients requested, already divided by the token count.

    h: [N, C] and weight [V, C] (and bias [V]) in the compute dtype; labels int64 [N]."""
    rows, _ = h.shape
    vocab = weight.shape[0]
    acc = torch.promote_types(h.dtype, torch.float32)
    valid = (labels != IGNORE_INDEX).sum()
    scale = (1.0 / valid.clamp(min=1).to(acc)).reshape(1)
    loss_rows = torch.empty(rows, device=h.device, dtype=acc)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(weight.shape, device=h.device, dtype=acc) if want_w else None
    grad_b = torch.zeros(vocab, device=h.device, dtype=acc) if want_b else None
    write = want_h or want_w or want_b
    buffer = torch.empty(min(chunk, rows), vocab, device=h.device, dtype=h.dtype)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        h_c, logits = h[start:end], buffer[: end - start]
        if bias is None:
            torch.mm(h_c, weight.t(), out=logits)
        else:
            torch.addmm(bias, h_c, weight.t(), out=logits)
        step(logits, labels[start:end], loss_rows[start:end], scale, write)
        if grad_h is not None:
            torch.mm(logits, weight, out=grad_h[start:end])
        if grad_w is not None:
            _accumulate(grad_w, logits.t(), h_c)
        if grad_b is not None:
            grad_b += logits.sum(0, dtype=acc)
    return loss_rows.sum() * scale[0], grad_h, grad_w, grad_b


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype, chunk, step):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            h = hidden.to(compute_dtype).contiguous()
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            loss, grad_h, grad_w, grad_b = _fused_pass(h, w, b, labels, chunk, step, need_h, need_w, need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if grad is None else grad.to(dtype) * grad_output.to(dtype))
        return grads[0], grads[1], grads[2], None, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype in _FLOATS and weight.dtype in _FLOATS:
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _step(backend: str, dtype: torch.dtype, device: torch.device, block: int | None):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and dtype in _FLOATS else "torch"
    if backend == "triton":
        if dtype not in _FLOATS:
            raise ValueError(f"the Triton kernel takes float16, bfloat16 or float32 logits, not {dtype}")
        return lambda *args: _ce_rows_triton(*args, block=block)
    if backend == "torch":
        return _ce_rows_torch
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """Mean cross entropy of ``hidden [..., C] @ weight[V, C]^T (+ bias [V])`` against ``labels [...]``.

    Labels of -100 are ignored; the mean is over the others (0 if there are none). ``chunk_size`` tokens of logits
    live at a time (default: ~1 GiB of them). ``backend``: "auto" (Triton on CUDA for float16/bfloat16/float32,
    else PyTorch), "triton" or "torch"; ``block``: the Triton kernel's vocabulary tile (tests).
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its last dim")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(device=h.device, dtype=torch.long).contiguous()
    vocab = weight.shape[0]
    if bool((((y < 0) & (y != IGNORE_INDEX)) | (y >= vocab)).any()):  # one host sync: the kernel would not notice
        raise ValueError(f"labels must lie in [0, {vocab}) (the LM head's rows) or be {IGNORE_INDEX} (ignored)")
    dtype = _compute_dtype(hidden, weight)
    chunk = chunk_size or _default_chunk(h.shape[0], weight.shape[0], dtype)
    step = _step(backend, dtype, h.device, block)
    tensors = (hidden, weight) + (() if bias is None else (bias,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedLinearCrossEntropy.apply(h, weight, bias, y, dtype, chunk, step)
    with torch.autocast(h.device.type, enabled=False):
        b = None if bias is None else bias.to(dtype)
        return _fused_pass(h.to(dtype).contiguous(), weight.to(dtype), b, y, chunk, step, False, False, False)[0]


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """The same loss with ``F.linear`` + ``F.cross_entropy`` on float32 (float64) logits, chunk by chunk, through
    autograd (the logits of every chunk are kept for the backward: a reference for tests, not for long inputs)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    total = None
    for start in range(0, h.shape[0], chunk_size):
        logits = F.linear(h[start : start + chunk_size], weight, bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        piece = F.cross_entropy(logits, y[start : start + chunk_size], ignore_index=IGNORE_INDEX, reduction="sum")
        total = piece if total is None else total + piece
    return total / (y != IGNORE_INDEX).sum().clamp(min=1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets for every position of ``labels [B, T]``: ``labels[:, 1:]``, then -100 for the last one."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted inside, -100 ignored, mean over the rest) for hidden states
    ``[B, T, C]`` and the LM head ``weight [V, C]``, fused (``fused_linear_cross_entropy``; kwargs go there).

    The shift moves the labels, not the hidden states: every position's row is used and the last position of each
    sequence is ignored, so no copy of the hidden states is made."""
    return fused_linear_cross_entropy(hidden, weight, shift_labels(labels), bias, **kwargs)
