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

_RUNNER = "_hf_patch_step_runner"  # attribute of the wrapped forward: its runner


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
