"""Launch-size helpers shared by the Triton kernels: SM count, dot-sized blocks, dot options."""
from __future__ import annotations

import functools

import torch
import triton

MIN_DOT = 16  # smallest tl.dot dimension


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (Triton's CPU interpreter: few programs keep tests
    fast)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_block(n: int) -> int:
    """Power-of-two block of at least n (and at least the smallest tl.dot dimension)."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def dot_options(x: torch.Tensor) -> dict:
    """UPCAST / DOT_PREC constexprs for kernels that multiply tensors of x's dtype: float32 dots in IEEE, half
    types with float32 accumulation. The CPU interpreter (tests) mis-multiplies bf16 in tl.dot, so there the
    operands are upcast to float32."""
    return dict(UPCAST=x.device.type == "cpu", DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")
