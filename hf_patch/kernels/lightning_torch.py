"""Lightning Attention-2 in plain PyTorch: input checks, the chunked form, the quadratic reference, one decode step.

Maths (per head, decay ``lam`` in (0, 1], no ``1/sqrt(d)`` scale, no normaliser)::

    S_t = lam * S_{t-1} + k_t^T v_t        (S_{-1} = initial_state, [D, E])
    o_t = q_t @ S_t                         ([E])

Layout: ``q, k`` are ``[B, T, H, D]``, ``v`` is ``[B, T, H, E]``, states are ``[B, H, D, E]``. With ``cu_seqlens``
(int ``[N + 1]``, ``B == 1``) the ``T`` axis packs ``N`` sequences and the state restarts at each boundary from
``initial_state[i]`` (``[N, H, D, E]``) or zero. These functions run on any device and in float64 too; autograd
flows through them (including to ``decay``).
"""

from __future__ import annotations

import weakref

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHUNK = 64


def check_lightning_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[int, list[int] | None]:
    """Validate shapes, dtypes and decay values; return the number of sequences ``N`` (``B`` without cu_seqlens)
    and cu_seqlens as a list (read once; None without cu_seqlens)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"lightning_attn expects q, k: [B, T, H, D] and v: [B, T, H, E]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q and k must have the same shape [B, T, H, D] and v must be [B, T, H, E] with the same B, T, H; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_float_qkv(q, k, v)
    batch, seq_len, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if seq_len == 0:
        raise ValueError("lightning_attn needs at least one token (T >= 1)")
    capturing = check_decay(decay, heads)
    num_seqs, bounds = batch, None
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"with cu_seqlens, pack the sequences along T and pass B == 1; got B = {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an int tensor [N + 1]; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if capturing:
            raise ValueError("variable-length calls read cu_seqlens on the host: they cannot be captured in a CUDA "
                             "graph")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != seq_len or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T = {seq_len}; got {bounds}")
        num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (num_seqs, heads, dim_k, dim_v):
        raise ValueError(
            f"initial_state must be [{'N' if cu_seqlens is not None else 'B'}, H, D, E] = "
            f"{[num_seqs, heads, dim_k, dim_v]}; got {list(initial_state.shape)}"
        )
    return num_seqs, bounds


def check_float_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v share one floating dtype (lightning_attn and lightning_attn_step alike)."""
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one floating dtype (float16, bfloat16, float32, float64); "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def check_decay(decay: torch.Tensor, heads: int) -> bool:
    """decay is a float [H] tensor of lambdas in (0, 1] (values not read during CUDA-graph capture, where that
    would sync). Returns whether the current CUDA stream is capturing."""
    if not isinstance(decay, torch.Tensor) or decay.shape != (heads,) or not decay.is_floating_point():
        raise ValueError(
            f"decay must be a float tensor of shape [H] = [{heads}] holding each head's lambda in (0, 1]; "
            f"got {decay.dtype if isinstance(decay, torch.Tensor) else type(decay).__name__} "
            f"{tuple(decay.shape) if isinstance(decay, torch.Tensor) else ''}"
        )
    capturing = decay.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        _check_decay_values(decay)
    return capturing


# Decay tensors whose values were checked: (id of the base tensor, view geometry) -> (weak reference to the base,
# its version counter when checked).
_CHECKED_DECAYS: dict[tuple, tuple[weakref.ref, int]] = {}


def _check_decay_values(decay: torch.Tensor) -> None:
    """Raise unless every lambda lies in (0, 1]. On the GPU that check is a host sync, so it runs once per decay
    tensor (a view, e.g. one layer's row of a model's decay table, counts as long as its base lives) until the
    tensor is written to."""
    base = decay if decay._base is None else decay._base
    key = (id(base), decay.storage_offset(), tuple(decay.shape), tuple(decay.stride()))
    seen = _CHECKED_DECAYS.get(key)
    if seen is not None and seen[0]() is base and seen[1] == decay._version:
        return
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"decay values must lie in (0, 1] (lambda = exp(-slope)); got {decay.tolist()}")
    _CHECKED_DECAYS[key] = (weakref.ref(base, lambda _: _CHECKED_DECAYS.pop(key, None)), decay._version)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_sequences(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    bounds: list[int] | None,
):
    """Yield ``(q, k, v, state)`` per group of sequences: the whole batch, or each packed sequence (cu_seqlens
    as a list: `bounds`)."""
    if bounds is None:
        yield q, k, v, initial_state
        return
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = None if initial_state is None else initial_state[i : i + 1]
        yield q[:, start:end], k[:, start:end], v[:, start:end], state


def _run_per_sequence(fn, q, k, v, decay, initial_state, output_final_state, cu_seqlens):
    _, bounds = check_lightning_inputs(q, k, v, decay, initial_state, cu_seqlens)
    ctype = _compute_dtype(q.dtype)
    log_decay = torch.log(decay.to(device=q.device, dtype=ctype))
    outs, states = [], []
    for qs, ks, vs, s0 in _split_sequences(q, k, v, initial_state, bounds):
        s0 = None if s0 is None else s0.to(ctype)
        o, s = fn(qs.to(ctype), ks.to(ctype), vs.to(ctype), log_decay, s0)
        outs.append(o)
        states.append(s)
    o = torch.cat(outs, dim=1).to(q.dtype)
    final_state = torch.cat(states, dim=0) if output_final_state else None
    return o, final_state


def _naive_one(q, k, v, log_decay, s0):
    """Quadratic form of one group: ``[B, T, H, *]`` in, ``(o [B, T, H, E], S [B, H, D, E])`` out."""
    seq_len = q.shape[1]
    pos = torch.arange(seq_len, device=q.device, dtype=q.dtype)
    gap = pos[:, None] - pos[None, :]  # [T, T]: t - s
    causal = gap >= 0
    mask = torch.exp(torch.where(causal, gap, 0)[None] * log_decay[:, None, None]) * causal  # [H, T, T]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * mask
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    end_w = torch.exp((seq_len - 1 - pos)[None, :] * log_decay[:, None])  # [H, T]
    state = torch.einsum("bshd,bshe->bhde", k * end_w.t()[None, :, :, None], v)
    if s0 is not None:
        query_w = torch.exp((pos + 1)[:, None] * log_decay)  # [T, H]
        o = o + torch.einsum("bthd,bhde->bthe", q * query_w[None, :, :, None], s0)
        state = state + torch.exp(seq_len * log_decay)[None, :, None, None] * s0
    return o, state


def _chunked_one(q, k, v, log_decay, s0, chunk: int = CHUNK):
    """Lightning Attention-2 tiling of one group: intra-chunk masked products in parallel, a scan over chunk states."""
    batch, seq_len, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if seq_len == 0:  # an empty packed sequence keeps its initial state
        return _naive_one(q, k, v, log_decay, s0)
    n_chunks = -(-seq_len // chunk)
    pad = n_chunks * chunk - seq_len
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    q, k, v = (x.reshape(batch, n_chunks, chunk, heads, x.shape[-1]) for x in (q, k, v))
    pos = torch.arange(chunk, device=q.device, dtype=q.dtype)
    gap = pos[:, None] - pos[None, :]
    causal = gap >= 0
    mask = torch.exp(torch.where(causal, gap, 0)[None] * log_decay[:, None, None]) * causal  # [H, C, C]
    scores = torch.einsum("bnthd,bnshd->bnhts", q, k) * mask
    o = torch.einsum("bnhts,bnshe->bnthe", scores, v)
    # Chunk lengths (the last may be partial) decide how far each key decays to its chunk end.
    lens = torch.full((n_chunks,), chunk, device=q.device, dtype=q.dtype)
    lens[-1] = chunk - pad
    key_exp = (lens[:, None] - 1 - pos[None, :]).clamp(min=0)  # [n, C]; padded keys are zero anyway
    key_w = torch.exp(key_exp[:, :, None] * log_decay)  # [n, C, H]
    chunk_kv = torch.einsum("bnshd,bnshe->bnhde", k * key_w[None, ..., None], v)  # [B, n, H, D, E]
    chunk_decay = torch.exp(lens[:, None] * log_decay)  # [n, H]
    state = q.new_zeros(batch, heads, dim_k, dim_v) if s0 is None else s0
    starts = []
    # unbind (not indexing) keeps the backward linear in the number of chunks
    for kv_i, decay_i in zip(chunk_kv.unbind(1), chunk_decay.unbind(0)):
        starts.append(state)
        state = decay_i[None, :, None, None] * state + kv_i
    start_states = torch.stack(starts, dim=1)  # [B, n, H, D, E]: state entering each chunk
    query_w = torch.exp((pos + 1)[:, None] * log_decay)  # [C, H]
    o = o + torch.einsum("bnthd,bnhde->bnthe", q * query_w[None, None, :, :, None], start_states)
    o = o.reshape(batch, n_chunks * chunk, heads, dim_v)[:, :seq_len]
    return o, state


def lightning_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quadratic reference ``O = [(Q K^T) * M] V`` (``M_ts = lam^(t-s)``, ``t >= s``); same API as ``lightning_attn``.

    Memory is O(T^2): tests only.
    """
    return _run_per_sequence(_naive_one, q, k, v, decay, initial_state, output_final_state, cu_seqlens)


def lightning_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-wise Lightning Attention-2 in PyTorch (any device, float64 allowed); same API as ``lightning_attn``.

    q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; decay: ``[H]``; initial_state: ``[B or N, H, D, E]``.
    Returns ``o [B, T, H, E]`` in ``q.dtype`` and the final state ``[B or N, H, D, E]`` (float32, float64 for
    float64 inputs) when ``output_final_state``.
    """
    return _run_per_sequence(_chunked_one, q, k, v, decay, initial_state, output_final_state, cu_seqlens)


def lightning_attn_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent decode step: ``S = lam * S + k^T v``, ``o = q @ S``.

    q, k: ``[B, H, D]``; v: ``[B, H, E]``; decay: ``[H]``; state: ``[B, H, D, E]`` (float32, or float64).
    Returns ``o [B, H, E]`` in ``q.dtype`` and the new state in the state's dtype.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError(f"lightning_attn_step expects tensors q, k, v; got "
                        f"{', '.join(type(t).__name__ for t in (q, k, v))}")
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"lightning_attn_step expects q, k: [B, H, D] and v: [B, H, E]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_float_qkv(q, k, v)
    batch, heads, dim_k = q.shape
    want = [batch, heads, dim_k, v.shape[-1]]
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a float32 (or float64) tensor [B, H, D, E] = {want}, got "
                        f"{type(state).__name__}: the first step starts from torch.zeros({', '.join(map(str, want))})")
    if state.shape != tuple(want) or state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be a float32 (or float64) tensor [B, H, D, E] = "
                         f"{want}; got {state.dtype} {list(state.shape)}")
    check_decay(decay, heads)
    ctype = state.dtype
    new_state = decay.to(ctype)[None, :, None, None] * state + k.to(ctype)[..., :, None] * v.to(ctype)[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", q.to(ctype), new_state)
    return o.to(q.dtype), new_state
