"""`generate` of a Loki-patched model: it runs on a `LokiCache`, passed through generate's public cache argument.

`install` sets `model.generate` to call the class's own `generate` with a `LokiCache` sized for the generation
wherever Transformers would build its default cache (`hf_patch.generation.generate_kwargs`). In mode "decode"
(exact prefill, Loki steps over rotated keys) any other cache is refused up front, and while the call runs every
attention layer checks that its keys came from a `LokiCache` (`LokiLayer.require_loki_cache`): a release that
ignored or replaced the cache would otherwise fall back silently to the slow path.

With graphed decode steps (`cuda_graph=True`), a greedy call that `hf_patch.decode_loop.greedy_call` accepts takes
its first new token from the class's `generate` and the rest from the whole-step loop
(`DecodeGraphs.greedy_generate`: token choice and stop check in the graph, no read of the device per token); the
same sequences, and the cache left at the same length.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn

from .. import decode_loop
from ..generation import generate_kwargs
from . import cuda_graph
from .arch import loki_layers
from .cache import LokiCache


def _generate(model: nn.Module, *args, **kwargs):
    """The class's `generate`, on a `LokiCache` unless the call caches nothing (see the module docstring)."""
    layers = loki_layers(model)
    decode = layers[0].mode == "decode"
    kwargs, cache = generate_kwargs(model, args, kwargs, LokiCache, lambda n: LokiCache(model, capacity=n),
                                    strict=decode)
    runner = cuda_graph.decode_graphs(model)
    call = None
    if runner is not None and runner.whole_step and isinstance(cache, LokiCache) and runner.serves(model.device):
        call = decode_loop.greedy_call(model, args, kwargs)
        if call is not None and cache.get_seq_length() >= call.input_ids.shape[1]:
            call = None  # a cache holding more than the prompt's prefix: generate sorts the inputs out
    with _requiring_loki_cache(layers, decode and cache is not None):
        if call is None:
            return type(model).generate(model, *args, **kwargs)
        first = type(model).generate(model, *args, **call.first_kwargs)
        return first if call.max_new_tokens == 1 else runner.greedy_generate(cache, call, first)


@contextlib.contextmanager
def _requiring_loki_cache(layers: list, require: bool) -> Iterator[None]:
    """Set every layer's `require_loki_cache` for the block (restored after: generate may nest, e.g. assisted)."""
    before = [layer.require_loki_cache for layer in layers]
    try:
        for layer in layers:
            layer.require_loki_cache = require
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.require_loki_cache = value


def install(model: nn.Module) -> None:
    """Route `model.generate` through `_generate` (idempotent; no-op for a model that does not generate)."""
    if hasattr(type(model), "generate") and not is_installed(model):
        model.generate = functools.partial(_generate, model)  # a partial: deepcopy rebinds it to the copy


def is_installed(model: nn.Module) -> bool:
    wrapper = model.__dict__.get("generate")
    return isinstance(wrapper, functools.partial) and wrapper.func is _generate


def remove(model: nn.Module) -> None:
    """Undo `install` (no-op when not installed)."""
    if is_installed(model):
        del model.generate
