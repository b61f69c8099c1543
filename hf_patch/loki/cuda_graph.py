"""One-token decode steps of a Loki-patched model, replayed as CUDA graphs (`patch_loki(..., cuda_graph=True)`).

Why: a Loki decode step is cheap on the GPU but costs many host calls (each PyTorch op and each Triton launch),
so on a slow host it is bound by the CPU, not the GPU. A CUDA graph replays the whole step, every layer, with
one launch.

How: the `LokiCache` runs in device-steps mode (`DeviceSteps`: the write position and each sequence's valid
range are device tensors) and the decode kernels read the cache length from the device (`kv_end`), so one graph,
captured for a cache's storage and batch size, serves every step until the cache reallocates (it grows by half
when full; `generate` sizes it for the whole generation). Whatever the graph cannot serve (several tokens per
sequence, gradients, attentions or hidden states asked for, another cache, a mask that is not left padding)
runs the model's ordinary forward.

Greedy `generate` calls go further by default (`DecodeGraphs.whole_step`): the graph of each step also chooses the
token and checks the stop (`hf_patch.decode_loop`), and the host reads the device once every `check_every` steps
instead of every token. Set `decode_graphs(model).whole_step = False` for one graph per forward under
Transformers' own loop (the same tokens; e.g. to measure the difference).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import decode_loop, step_graphs
from ..generation import CACHE_KWARG, find_cache
from ..kernels.loki import DecodeWorkspace
from .cache import DeviceSteps, LokiCache


def left_padding_start(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """First valid key per sequence, int32 [B], of a 2-D mask [B, length] that is left padding (zeros, then ones,
    in every row); None when the mask is absent. Raises ValueError for any other mask (one host sync)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be [B={batch}, cache length + 1 = {length}], got "
                         f"{tuple(attention_mask.shape)}")
    ones = attention_mask.bool()
    if not bool((ones[:, 1:] >= ones[:, :-1]).all()):
        raise ValueError("a graphed decode step takes left padding only: each attention_mask row zeros, then ones")
    return length - ones.sum(-1, dtype=torch.int32)


@dataclass
class _Captured:
    """One captured step: its static inputs and output, and what it was captured for. Its steps' workspace holds
    the scratch buffers the graph writes (their addresses are baked into its launches): it lives with the graph."""

    key: tuple  # (batch, capacity, cache and weight addresses, logits_to_keep, dense layers): baked into the launches
    steps: DeviceSteps
    input_ids: torch.Tensor  # [B, 1]
    position_ids: torch.Tensor  # [B, 1]
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    next_position: int = -1  # the cache length that steps.position holds (host copy)
    greedy: decode_loop.GreedyState | None = None  # a whole greedy step: the token chosen in the graph too


class DecodeGraphs(step_graphs.StepRunner):
    """Runs eligible one-token forward calls of a patched model through a captured CUDA graph, and greedy
    `generate` loops (`greedy_generate`) with the token choice and stop check in the graph when `whole_step`."""

    whole_step = True  # greedy generate calls that `decode_loop.greedy_call` accepts run `greedy_generate`
    check_every = 16  # steps between the whole-step loop's reads of the device (finished.all())

    def __init__(self, forward: Callable, run_on_cpu: bool = False):
        super().__init__(forward, run_on_cpu)
        self.greedy: tuple[decode_loop.GreedyState, DeviceSteps] | None = None  # the loop's state, kept for reuse
        self.greedy_captured: _Captured | None = None  # the loop's step, beside `captured` (the one-token forward's)

    def serves(self, device: torch.device) -> bool:
        """Whether steps on this device run the device-steps body (CUDA, or the CPU under `run_on_cpu`)."""
        return device.type == "cuda" or self.run_on_cpu

    def eligible(self, kwargs: dict) -> bool:
        """Whether a forward call with these arguments can replay a graph."""
        cache = step_graphs.one_token_cache(kwargs, LokiCache, self.run_on_cpu)
        if cache is None:
            return False
        lengths = {layer.length for layer in cache.layers}
        return all(layer.is_initialized for layer in cache.layers) and len(lengths) == 1 and lengths != {0}

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
             **kwargs) -> CausalLMOutputWithPast:
        """The forward of one token per sequence: input_ids [B, 1] -> logits [B, 1, V] (the cache, passed as
        `cache` or `past_key_values`, advances)."""
        cache, batch = find_cache(kwargs), input_ids.shape[0]
        length = cache.get_seq_length()
        start = left_padding_start(attention_mask, batch, length + 1)
        cache.reserve(length + 1)
        key = (batch, cache.capacity(), cache.buffers_key(), self.weights_key(),
               logits_to_keep if isinstance(logits_to_keep, int) else None, cache.dense_steps(length + 1))
        cap = self.captured
        if cap is None or cap.key != key:  # a cache with the same storage (e.g. the next generate's) reuses it
            cap = self.captured = self._new_step(key, batch, input_ids.device)
        cap.input_ids.copy_(input_ids)
        if position_ids is not None:
            cap.position_ids.copy_(position_ids)
        else:
            cap.position_ids.fill_(length)
        if cap.next_position != length:
            cap.steps.position.fill_(length)
        if start is None:
            cap.steps.kv_start.zero_()
        else:
            cap.steps.kv_start.copy_(start)
        if not input_ids.is_cuda or self.run_on_cpu:
            logits = self._run(cap, cache, logits_to_keep, capture=False)
        else:
            if cap.graph is None:
                cap.logits = self._run(cap, cache, logits_to_keep, capture=True)
            cap.graph.replay()
            logits = cap.logits.clone()
        cap.next_position = length + 1
        cache.advance(1)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})

    def _new_step(self, key: tuple, batch: int, device: torch.device) -> _Captured:
        self.captured = None  # free the previous graph first
        steps = DeviceSteps(position=torch.zeros(1, dtype=torch.int64, device=device),
                            kv_start=torch.zeros(batch, dtype=torch.int32, device=device),
                            kv_end=torch.zeros(batch, dtype=torch.int32, device=device), workspace=DecodeWorkspace())
        return _Captured(key, steps,
                         input_ids=torch.zeros(batch, 1, dtype=torch.int64, device=device),
                         position_ids=torch.zeros(batch, 1, dtype=torch.int64, device=device))

    @torch.no_grad()
    def greedy_generate(self, cache: LokiCache, call: decode_loop.GreedyCall, first: torch.Tensor) -> torch.Tensor:
        """The rest of a greedy `generate` call after its first new token (`first`: [B, L + 1], `cache` holding
        the prompt): the whole-step loop of `hf_patch.decode_loop`, each step replayed as one CUDA graph. Returns
        the sequences `generate` returns; the cache ends where `generate` leaves it."""
        batch, device, length = first.shape[0], first.device, first.shape[1] - 1
        start = left_padding_start(call.attention_mask.to(device), batch, length)  # raises as a graphed step does
        n_eos = len(call.eos or ())
        if self.greedy is None or not self.greedy[0].fits(batch, self.check_every, n_eos, device):
            self.greedy_captured = self.greedy = None  # a graph on the old state must not outlive it
            self.greedy = (decode_loop.GreedyState.allocate(batch, self.check_every, n_eos, device),
                           DeviceSteps(position=torch.zeros(1, dtype=torch.int64, device=device),
                                       kv_start=torch.zeros(batch, dtype=torch.int32, device=device),
                                       kv_end=torch.zeros(batch, dtype=torch.int32, device=device),
                                       workspace=DecodeWorkspace()))
        state, steps = self.greedy
        state.start(call, first)
        if start is None:
            steps.kv_start.zero_()
        else:
            steps.kv_start.copy_(start)
        key = None  # what the step's graph is captured for, but the dense layers: the same until the cache grows

        def step() -> None:
            nonlocal key
            length = cache.get_seq_length()
            if key is None or key[1] < length + 1:  # no room for this step's token: grow in place (a new graph)
                cache.reserve(length + 1)
                key = (batch, cache.capacity(), cache.buffers_key(), self.weights_key(), 1, state.key(),
                       tuple(t.data_ptr() for t in (steps.position, steps.kv_start, steps.kv_end)))
            self._greedy_step(cache, key)

        sequences, extra = decode_loop.run_greedy(call, first, state, step)
        cache.crop(-extra)
        return sequences

    def _greedy_step(self, cache: LokiCache, key: tuple) -> None:
        """One step of the whole-step loop: a graph per `key` (+ which layers attend densely at this length)."""
        length = cache.get_seq_length()
        key = key + (cache.dense_steps(length + 1),)
        cap = self.greedy_captured
        if cap is None or cap.key != key:
            self.greedy_captured = None  # free the previous graph first
            state, steps = self.greedy
            cap = self.greedy_captured = _Captured(key, steps, state.input_ids, state.position_ids, greedy=state)
        if cap.next_position != length:
            cap.steps.position.fill_(length)
        if cap.input_ids.device.type != "cuda":  # the CPU, which `serves` under run_on_cpu only
            self._run(cap, cache, 1, capture=False)
        else:
            if cap.graph is None:
                cap.logits = self._run(cap, cache, 1, capture=True)
            cap.graph.replay()
        cap.next_position = length + 1
        cache.advance(1)

    def _body(self, cap: _Captured, cache: LokiCache, logits_to_keep) -> torch.Tensor:
        """The step as device work only: the valid range ends after this token; the model's forward with the
        cache in device-steps mode; the write position moves on; for a whole greedy step, the token is chosen."""
        cap.steps.kv_end.copy_(cap.steps.position.expand_as(cap.steps.kv_end)).add_(1)
        out = self.forward(input_ids=cap.input_ids, position_ids=cap.position_ids, **{CACHE_KWARG: cache},
                           cache_position=cap.steps.position, use_cache=True, logits_to_keep=logits_to_keep)
        cap.steps.position.add_(1)
        if cap.greedy is not None:
            cap.greedy.choose(out.logits)
        return out.logits

    def _run(self, cap: _Captured, cache: LokiCache, logits_to_keep, capture: bool) -> torch.Tensor:
        """Run the body eagerly (warm-up, or every step without graphs); with `capture`, then capture it (the
        writes repeat on replay: same values at the same position)."""
        cache.set_device_steps(cap.steps)
        try:
            if not capture:
                return self._body(cap, cache, logits_to_keep)
            restore = cap.greedy.saved() if cap.greedy is not None else None

            def rewind() -> None:
                cap.steps.position.sub_(1)
                if restore is not None:
                    restore()

            cap.graph, logits = self.capture(lambda: self._body(cap, cache, logits_to_keep), rewind=rewind,
                                             device=cap.input_ids.device)
            return logits
        finally:
            cache.set_device_steps(None)


def check_graphable(model: nn.Module) -> None:
    """Raise ValueError unless `install` can serve `model` (a causal LM: its steps return logits)."""
    if model.get_output_embeddings() is None:
        raise ValueError(f"cuda_graph=True replays the decode steps of a causal LM; {type(model).__name__} has no LM "
                         "head: load the model with AutoModelForCausalLM")


def install(model: nn.Module) -> None:
    """Wrap `model.forward` (of a model `check_graphable` accepts) so that eligible one-token steps replay CUDA
    graphs (idempotent)."""
    step_graphs.wrap_forward(model, DecodeGraphs)


def remove(model: nn.Module) -> None:
    """Undo `install` (no-op when not installed)."""
    step_graphs.unwrap_forward(model)


def decode_graphs(model: nn.Module) -> DecodeGraphs | None:
    """The `DecodeGraphs` of a model with graphed decode steps, else None."""
    runner = step_graphs.runner_of(model)
    return runner if isinstance(runner, DecodeGraphs) else None
