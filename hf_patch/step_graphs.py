"""Graphed one-token decode steps, shared by the Loki patch (`hf_patch.loki.cuda_graph`) and the TransNormer
(`hf_patch.transnormer.cuda_graph`): a model's forward wrapped so that the calls a runner accepts go to it, and the
warm-up and capture of a step body as a CUDA graph.

A runner has `eligible(kwargs) -> bool` (whether it serves a forward call with these keyword arguments) and
`step(**kwargs)` (the call's output); it is built from the model's own bound forward, which it calls to capture.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .generation import CACHE_NAMES, find_cache

_RUNNER = "_hf_patch_step_runner"  # attribute of the wrapped forward: its runner
# forward() arguments a graphed step takes; any other argument, unless None or False (e.g. output_attentions,
# inputs_embeds), sends the call to the ordinary forward
STEP_ARGS = {"input_ids", "attention_mask", "position_ids", *CACHE_NAMES, "cache_position", "use_cache",
             "return_dict", "logits_to_keep"}


class StepRunner:
    """Base of a graph runner: the model's own (bound) forward, the captured step, the capture stream and count.
    run_on_cpu: serve CPU calls too, running the step body eagerly (no graph; tests check the host logic so)."""

    def __init__(self, forward: Callable, run_on_cpu: bool = False):
        self.forward = forward
        self.run_on_cpu = run_on_cpu
        self.captured = None
        self.stream: torch.cuda.Stream | None = None
        self.captures = 0  # how many graphs were captured (tests and benchmarks read it)

    def weights_key(self) -> tuple:
        """Addresses and dtype of the input and output embeddings: a model moved or cast after a capture (which
        replaces its weights) must not replay a graph that reads the old ones."""
        model = self.forward.__self__
        weights = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        return tuple(w.data_ptr() for w in weights) + (weights[0].dtype,)

    def capture(self, body: Callable[[], Any], rewind: Callable[[], None], device: torch.device) -> tuple[Any, Any]:
        """`capture` on this runner's stream (made on first use), counted in `captures`."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        graph, out = capture(body, self.stream, rewind)
        self.captures += 1
        return graph, out


def one_token_cache(kwargs: dict, cache_type: type, run_on_cpu: bool) -> Any | None:
    """The cache of a forward call (keyword arguments) that a graphed step can serve: one token per sequence, no
    gradients, a `cache_type` cache, CUDA inputs (or `run_on_cpu`), nothing else asked for; else None."""
    ids, cache = kwargs.get("input_ids"), find_cache(kwargs)
    if torch.is_grad_enabled() or ids is None or ids.dim() != 2 or ids.shape[1] != 1:
        return None
    if not (ids.is_cuda or run_on_cpu) or not isinstance(cache, cache_type):
        return None
    if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
        return None
    if any(value is not None and value is not False for name, value in kwargs.items() if name not in STEP_ARGS):
        return None
    return cache


def wrap_forward(model: nn.Module, make_runner: Callable[[Callable], Any]) -> None:
    """Wrap `model.forward` so that calls `runner.eligible` accepts go to `runner.step` (idempotent; `runner =
    make_runner(original_forward)`)."""
    if hasattr(model.forward, _RUNNER):
        return
    original = model.forward
    runner = make_runner(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        call = dict(zip(("input_ids",), args), **kwargs) if len(args) <= 1 else None  # input_ids comes first
        if call is not None and runner.eligible(call):
            return runner.step(**call)
        return original(*args, **kwargs)

    setattr(forward, _RUNNER, runner)
    model.forward = forward


def unwrap_forward(model: nn.Module) -> None:
    """Undo `wrap_forward` (no-op when not wrapped)."""
    if hasattr(model.__dict__.get("forward"), _RUNNER):
        del model.forward


def runner_of(model: nn.Module) -> Any | None:
    """The runner of a model whose forward `wrap_forward` wrapped, else None."""
    return getattr(model.__dict__.get("forward"), _RUNNER, None)


def capture(body: Callable[[], Any], stream: torch.cuda.Stream, rewind: Callable[[], None]) -> tuple[Any, Any]:
    """Run `body` once on `stream` (compiles kernels, sizes scratch buffers), undo its device writes with `rewind`,
    then capture it as a CUDA graph. Returns (graph, what the captured body returned: the tensors each replay
    writes). Nothing runs during the capture itself: the caller replays the graph for the step."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
        rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = body()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out
