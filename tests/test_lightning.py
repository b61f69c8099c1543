"""Lightning Attention-2: chunked PyTorch form, Triton kernels and decode step vs the quadratic reference.

The Triton kernels run compiled on a GPU and through Triton's CPU interpreter elsewhere (tests/conftest.py): their
inputs are drawn on the CPU (seeded), moved to DEVICE, and compared on the CPU with references computed there.
"""

import pytest
import torch

from hf_patch.kernels import lightning_attn, lightning_attn_chunked, lightning_attn_naive, lightning_attn_step
from hf_patch.kernels.lightning import lightning_attn_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter elsewhere


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    return ((x - ref).norm() / ref.norm()).item()


def to(device, *tensors):
    """The tensors (None kept) on ``device``: the CPU-drawn inputs for the kernels."""
    return [None if t is None else t.to(device) for t in tensors]


def make_inputs(batch, seq_len, heads, dim_k, dim_v, decay, dtype, num_states=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq_len, heads, dim_k, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(batch, seq_len, heads, dim_v, generator=gen).to(dtype)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(num_states or batch, heads, dim_k, dim_v, generator=gen).to(state_dtype)
    return q, k, v, torch.tensor(decay, dtype=state_dtype), s0


def outputs_and_grads(fn, q, k, v, decay, s0, cu_seqlens=None, cast=None, **kwargs):
    """(o, final state, dq, dk, dv, ds0) for a fixed random cotangent on o and on the final state."""
    xs = [x.detach().to(cast or x.dtype).requires_grad_() for x in (q, k, v)]
    state = s0.detach().to(torch.float64 if cast == torch.float64 else s0.dtype).requires_grad_()
    o, final = fn(*xs, decay.to(state.dtype), state, True, cu_seqlens, **kwargs)
    gen = torch.Generator().manual_seed(1)  # the cotangents are drawn on the CPU: the same ones on every device
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    loss.backward()
    return [o.detach(), final.detach()] + [x.grad for x in xs] + [state.grad]


CASES = [  # (batch, seq_len, heads, dim_k, dim_v, decay per head, cu_seqlens)
    (2, 1, 2, 8, 8, [0.9, 1.0], None),
    (2, 63, 2, 8, 12, [1.0, 1.0], None),
    (1, 130, 2, 16, 8, [0.02, 0.7], None),
    (1, 200, 2, 8, 8, [0.5, 0.999], [0, 0, 70, 71, 200]),
]


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_naive_float64(case):
    batch, seq_len, heads, dim_k, dim_v, decay, cu = case
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    inputs = make_inputs(batch, seq_len, heads, dim_k, dim_v, decay, torch.float64, num_states=len(cu) - 1 if cu else None)
    got = outputs_and_grads(lightning_attn_chunked, *inputs, cu_t)
    ref = outputs_and_grads(lightning_attn_naive, *inputs, cu_t)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ds0"], got, ref):
        assert rel(a, b) < 1e-12, name


def test_naive_matches_recurrence_and_empty_sequence_keeps_state():
    q, k, v, decay, s0 = make_inputs(1, 9, 2, 4, 3, [0.3, 1.0], torch.float64, num_states=3)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    o, final = lightning_attn_naive(q, k, v, decay, s0, True, cu)
    for i, (start, end) in enumerate([(0, 4), (4, 4), (4, 9)]):
        state = s0[i : i + 1]
        for t in range(start, end):
            step_o, state = lightning_attn_step(q[:, t], k[:, t], v[:, t], decay, state)
            assert torch.allclose(step_o, o[:, t], rtol=1e-12, atol=1e-12)
        assert torch.allclose(state[0], final[i], rtol=1e-12, atol=1e-12)
    assert torch.equal(final[1], s0[1])


TRITON_CASES = [  # (batch, seq_len, heads, dim_k, dim_v, decay, cu_seqlens, seg_len)
    (2, 70, 2, 16, 32, [1.0, 1.0], None, None),  # no decay, one segment, D != E
    (1, 150, 2, 24, 40, [0.001, 0.9], None, 64),  # strong decay, non-power-of-two dims, three segments
    (1, 200, 2, 16, 16, [0.5, 0.99], [0, 0, 70, 71, 200], 64),  # packed, an empty sequence, segments
    (1, 200, 2, 16, 16, [0.8, 1.0], [0, 130, 200], None),  # packed, one segment per sequence
]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_naive_float32(case):
    batch, seq_len, heads, dim_k, dim_v, decay, cu, seg_len = case
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    inputs = make_inputs(batch, seq_len, heads, dim_k, dim_v, decay, torch.float32, num_states=len(cu) - 1 if cu else None)
    # float32 dots run as tf32x3 on a GPU (about float32 accuracy); 2e-6 is the interpreter's (true float32) bound
    got = outputs_and_grads(lightning_attn_triton, *to(DEVICE, *inputs, cu_t), seg_len=seg_len)
    ref = outputs_and_grads(lightning_attn_naive, *inputs, cu_t, cast=torch.float64)  # float64, on the CPU
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ds0"], got, ref):
        assert not torch.isnan(a).any(), name
        assert rel(a, b) < 2e-6, name


def test_triton_float16_and_no_initial_state():
    # (bfloat16 dots are wrong in Triton's CPU interpreter; bf16 is checked on the GPU by scripts/bench_lightning.py)
    q, k, v, decay, _ = make_inputs(2, 90, 2, 16, 16, [0.9, 0.999], torch.float16)
    o, final = lightning_attn_triton(*to(DEVICE, q, k, v, decay), output_final_state=True, seg_len=64)
    ref_o, ref_final = lightning_attn_naive(q.double(), k.double(), v.double(), decay.double(), output_final_state=True)
    assert o.dtype == torch.float16 and final.dtype == torch.float32
    # float16 operands meet tf32 dots on a GPU (10-bit mantissa, like float16 itself: 4.1e-4 measured on an H100);
    # the interpreter multiplies them in true float32.
    state_tol = 1e-3 if DEVICE == "cuda" else 1e-4
    assert rel(o, ref_o) < 2e-3 and rel(final, ref_final) < state_tol


def test_prefill_then_steps_equals_one_pass():
    q, k, v, decay, s0 = make_inputs(2, 80, 2, 16, 16, [0.95, 1.0], torch.float32)
    full, full_state = lightning_attn_naive(q.double(), k.double(), v.double(), decay.double(), s0.double(), True)
    q, k, v, decay, s0 = to(DEVICE, q, k, v, decay, s0)  # prefill and decode steps where the model runs them
    for prefill_fn in (lightning_attn_chunked, lightning_attn_triton):
        o, state = prefill_fn(q[:, :70], k[:, :70], v[:, :70], decay, s0, True)
        outs = [o]
        for t in range(70, 80):
            step_o, state = lightning_attn_step(q[:, t], k[:, t], v[:, t], decay, state)
            outs.append(step_o[:, None])
        assert rel(torch.cat(outs, 1), full) < 1e-6
        assert rel(state, full_state) < 1e-6


def test_dispatcher_uses_pytorch_off_gpu():
    q, k, v, decay, s0 = make_inputs(1, 20, 2, 8, 8, [0.9, 0.5], torch.float64)
    o, final = lightning_attn(q, k, v, decay, s0, True)
    ref_o, ref_final = lightning_attn_naive(q, k, v, decay, s0, True)
    assert o.dtype == torch.float64 and rel(o, ref_o) < 1e-12 and rel(final, ref_final) < 1e-12
    assert lightning_attn(q, k, v, decay)[1] is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.zeros(1, 4, 2, 4)), "same shape"),
        (dict(v=torch.zeros(1, 4, 2)), "expects q, k"),
        (dict(decay=torch.tensor([0.5, 0.0])), r"\(0, 1\]"),
        (dict(decay=torch.tensor([0.5, 1.5])), r"\(0, 1\]"),
        (dict(decay=torch.tensor([0.5])), "shape \\[H\\]"),
        (dict(initial_state=torch.zeros(1, 2, 8, 4)), "initial_state must be"),
        (dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "end at T"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32), q=torch.zeros(2, 4, 2, 8),
              k=torch.zeros(2, 4, 2, 8), v=torch.zeros(2, 4, 2, 8)), "B == 1"),
        (dict(v=torch.zeros(1, 4, 2, 8, dtype=torch.float64)), "share one floating dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(q=torch.zeros(1, 4, 2, 8), k=torch.zeros(1, 4, 2, 8), v=torch.zeros(1, 4, 2, 8),
                decay=torch.tensor([0.5, 1.0]), initial_state=None, cu_seqlens=None)
    args.update(change)
    for fn in (lightning_attn, lightning_attn_triton):
        with pytest.raises(ValueError, match=message):
            fn(args["q"], args["k"], args["v"], args["decay"], args["initial_state"], False, args["cu_seqlens"])


def test_decay_check_is_cached_but_sees_writes():
    """The (0, 1] check runs once per decay tensor (a host sync on the GPU) yet still catches a later in-place
    write and a different row of the same table."""
    x = torch.zeros(1, 4, 2, 8)
    table = torch.tensor([[0.5, 1.0], [0.9, 0.2]])
    lightning_attn(x, x, x, table[0])
    lightning_attn(x, x, x, table[0])  # cached: no new check needed, still fine
    table[1, 1] = 0.0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lightning_attn(x, x, x, table[1])
    table[0, 0] = 2.0  # the version counter moved: row 0 is checked again
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lightning_attn(x, x, x, table[0])


def test_triton_only_errors():
    x = torch.zeros(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="lightning_attn_chunked for float64"):
        lightning_attn_triton(x, x, x, torch.tensor([0.5, 1.0], dtype=torch.float64))
    big = torch.zeros(1, 4, 2, 512)
    with pytest.raises(ValueError, match="up to 256"):
        lightning_attn_triton(big, big, big, torch.tensor([0.5, 1.0]))
    y = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="decay.detach"):
        lightning_attn_triton(y, y, y, torch.tensor([0.5, 1.0], requires_grad=True))
    with pytest.raises(ValueError, match="state must be"):
        lightning_attn_step(y[:, 0], y[:, 0], y[:, 0], torch.tensor([0.5, 1.0]), torch.zeros(1, 2, 8, 4))


def test_triton_segments_without_states_match_naive():
    """Cut into segments, no initial state, no final state: the segment pass must start every chain from zero."""
    q, k, v, decay, _ = make_inputs(2, 190, 2, 40, 24, [0.3, 1.0], torch.float32)
    xs = [x.to(DEVICE, copy=True).requires_grad_() for x in (q, k, v)]
    o, final = lightning_attn_triton(*xs, decay.to(DEVICE), seg_len=64)
    assert final is None
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))  # on the CPU
    (o * cot.to(DEVICE)).sum().backward()
    refs = [x.double().requires_grad_() for x in (q, k, v)]
    ref_o, _ = lightning_attn_naive(*refs, decay.double())
    (ref_o * cot.double()).sum().backward()
    assert rel(o, ref_o) < 2e-6
    for x, ref in zip(xs, refs):
        assert rel(x.grad, ref.grad) < 2e-6


def test_launch_config_plans_the_segments():
    """`config` is the call's launch settings: more programs per SM cut a sequence that the defaults keep whole
    into segments (gradients included), with the same result."""
    from hf_patch.kernels.lightning import LightningConfig, _plan

    cut = LightningConfig(programs_per_sm=64, min_segment=64)
    device = torch.device(DEVICE)
    assert not _plan(None, 1, 150, 2, 16, 16, device, None, LightningConfig()).multi
    assert _plan(None, 1, 150, 2, 16, 16, device, None, cut).multi
    inputs = to(DEVICE, *make_inputs(1, 150, 2, 16, 16, [0.9, 0.99], torch.float32))
    whole = outputs_and_grads(lightning_attn_triton, *inputs)
    segmented = outputs_and_grads(lightning_attn_triton, *inputs, config=cut)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ds0"], segmented, whole):
        assert rel(a, b) < 2e-6, name
    assert not all(torch.equal(a, b) for a, b in zip(segmented, whole))  # the segments ran: sums in another order
