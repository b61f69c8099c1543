"""TransNormer decode steps replayed as CUDA graphs (`enable_graph_decoding(model)`).

Why: a TransNormer token costs the same at any context length (an O(1) recurrent state), but eagerly each of its
~20 ops per layer is a host launch, so on a slow host a step costs milliseconds of Python, not GPU time. A CUDA
graph replays the whole step, every layer and the LM head, with one launch.

How: each replay updates the cache's per-layer states [B, H, D, E] (float32) in place; the position (LRPE reads
it) and the new token's padding flag are device inputs. So one graph, captured for a cache's states, serves every
step of that cache (a generation); a new cache (the next `generate`) gets a new capture. Other calls (prefill,
several tokens, extra outputs, gradients) run the model's ordinary forward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import step_graphs
from ..generation import CACHE_KWARG, find_cache
from .cache import TransNormerCache


@dataclass
class _Captured:
    """One captured step: its static inputs, states and output, and what it was captured for."""

    key: tuple  # (batch, state addresses, weights key, logits_to_keep): what the launches baked in
    input_ids: torch.Tensor  # [B, 1]
    padding: torch.Tensor  # [B, 1]: 1 = token, 0 = padding
    position: torch.Tensor  # int64 [1]
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class TransNormerGraphs(step_graphs.StepRunner):
    """Runs eligible one-token forward calls of a TransNormerForCausalLM through a captured CUDA graph."""

    def eligible(self, kwargs: dict) -> bool:
        """Whether a forward call with these arguments can replay a graph."""
        cache = step_graphs.one_token_cache(kwargs, TransNormerCache, self.run_on_cpu)
        if cache is None:
            return False
        return cache.seen_tokens > 0 and all(state is not None for state in cache.states)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """The forward of one token per sequence: input_ids [B, 1] -> logits [B, 1, V] (the cache, passed as
        `cache` or `past_key_values`, advances)."""
        cache, batch = find_cache(kwargs), input_ids.shape[0]
        key = (batch, tuple(s.data_ptr() for s in cache.states), self.weights_key(),
               logits_to_keep if isinstance(logits_to_keep, int) else None)
        cap = self.captured
        if cap is None or cap.key != key:
            self.captured = None  # free the previous graph first
            cap = self.captured = _Captured(
                key, input_ids=torch.zeros_like(input_ids),
                padding=torch.ones(batch, 1, dtype=torch.int64, device=input_ids.device),
                position=torch.zeros(1, dtype=torch.int64, device=input_ids.device))
        cap.input_ids.copy_(input_ids)
        if attention_mask is None:
            cap.padding.fill_(1)
        else:
            cap.padding.copy_(attention_mask[:, -1:])
        cap.position.fill_(cache.seen_tokens)
        cache.device_position = cap.position
        try:
            if not input_ids.is_cuda or self.run_on_cpu:
                logits = self._body(cap, cache, logits_to_keep)
            else:
                if cap.graph is None:
                    self._capture(cap, cache, logits_to_keep)
                cap.graph.replay()
                logits = cap.logits.clone()
        finally:
            cache.device_position = None
        cache.advance(1)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})

    def _body(self, cap: _Captured, cache: TransNormerCache, logits_to_keep) -> torch.Tensor:
        out = self.forward(input_ids=cap.input_ids, attention_mask=cap.padding, cache=cache,
                           use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits

    def _capture(self, cap: _Captured, cache: TransNormerCache, logits_to_keep) -> None:
        """Warm up (then restore the states the warm-up advanced), capture; the caller replays for this step."""
        saved = [s.clone() for s in cache.states]

        def rewind() -> None:
            for state, old in zip(cache.states, saved):
                state.copy_(old)

        cap.graph, cap.logits = self.capture(lambda: self._body(cap, cache, logits_to_keep), rewind,
                                             cap.input_ids.device)


def enable_graph_decoding(model: nn.Module, *, run_on_cpu: bool = False) -> nn.Module:
    """Make each one-token step of a `TransNormerForCausalLM` (as `generate` and manual loops with a
    `TransNormerCache` take them) replay a CUDA graph on CUDA (idempotent; returns the model). Weights moved or cast
    afterwards get a new graph; `disable_graph_decoding` undoes it. run_on_cpu: CPU steps take the same path, their
    body run eagerly (no graph: tests)."""
    from .modeling_transnormer import TransNormerForCausalLM

    if not isinstance(model, TransNormerForCausalLM):
        raise TypeError(f"graph decoding takes a TransNormerForCausalLM, got {type(model).__name__}")
    step_graphs.wrap_forward(model, functools.partial(TransNormerGraphs, run_on_cpu=run_on_cpu))
    return model


def disable_graph_decoding(model: nn.Module) -> nn.Module:
    """Undo `enable_graph_decoding` (no-op when not enabled); returns the model."""
    step_graphs.unwrap_forward(model)
    return model


def decode_graphs(model: nn.Module) -> TransNormerGraphs | None:
    """The `TransNormerGraphs` of a model with graphed decode steps, else None."""
    runner = step_graphs.runner_of(model)
    return runner if isinstance(runner, TransNormerGraphs) else None
