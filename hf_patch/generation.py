"""The caches hf-patch hands `generate`, through its public cache argument, on every supported Transformers release.

Transformers 5.25 renamed the cache argument of `generate`, `prepare_inputs_for_generation`, every model's
`forward` and the outputs' field from `past_key_values` to `cache` (the old name deprecated, removed in 5.40).
`CACHE_KWARG` is the installed release's name; `find_cache` reads a call's cache under either name, and
`generate_kwargs` gives `generate` our own cache where it would otherwise build its default one (no private
method of `GenerationMixin` is replaced).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import Cache

CACHE_NAMES = ("cache", "past_key_values")
PREALLOCATED_NEW_TOKENS = 4096  # room for generated tokens a cache is sized for up front; past it, it grows
CACHE_KWARG = next(name for name in CACHE_NAMES
                   if name in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters)


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call passes as `cache` or `past_key_values` (None if neither); both at once is a ValueError."""
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache once, as cache= (named past_key_values= before transformers 5.25), "
                         "not both")
    return kwargs[given[0]] if given else None


def generate_kwargs(
    model: GenerationMixin,
    args: tuple,
    kwargs: dict[str, Any],
    cache_type: type[Cache],
    make_cache: Callable[[int], Cache],
    strict: bool = True,
) -> tuple[dict[str, Any], Cache | None]:
    """`generate(*args, **kwargs)`'s keyword arguments with its cache under `CACHE_KWARG`, and that cache.

    The cache is the one given (under either name) or, where `generate` would build its default cache (caching
    on, no `cache_implementation`), `make_cache(capacity)`, capacity = what the generation can cache (`_capacity`):
    a hint, caches may grow past it. None when the call caches nothing (use_cache=False).
    strict: a cache that is not a `cache_type`, or a `cache_implementation` that would have `generate` build
    another cache, is a ValueError that says what to pass instead. `cache_implementation="paged"` (continuous
    batching, which runs its own paged attention) is refused whatever `strict`.
    """
    cache = find_cache(kwargs)
    kwargs = {name: value for name, value in kwargs.items() if name not in CACHE_NAMES}
    config = _generation_config(model, args, kwargs)
    use_cache = kwargs["use_cache"] if kwargs.get("use_cache") is not None else config.use_cache
    implementation = kwargs.get("cache_implementation", config.cache_implementation)
    wanted = cache_type.__name__
    if kwargs.get("cache_implementation") == "paged":  # generate's switch to continuous batching (generate_batch)
        raise ValueError(f"cache_implementation='paged' has generate switch to continuous batching, whose paged "
                         f"attention replaces {type(model).__name__}'s own: drop cache_implementation (generate then "
                         f"runs on a {wanted})")
    if strict and cache is not None and not isinstance(cache, cache_type):
        raise ValueError(f"{type(model).__name__}.generate runs on a {wanted}, got a {type(cache).__name__}: "
                         f"pass no cache (generate then builds a {wanted}) or a {wanted}")
    if cache is None and use_cache and implementation is not None:
        if strict:
            raise ValueError(f"cache_implementation={implementation!r} would have generate build its own cache, but "
                             f"{type(model).__name__}.generate runs on a {wanted}: drop cache_implementation "
                             "(and generation_config.cache_implementation)")
    elif cache is None and use_cache:
        cache = make_cache(_capacity(model, config, args, kwargs))
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    return kwargs, cache


def _generation_config(model: GenerationMixin, args: tuple, kwargs: dict[str, Any]) -> GenerationConfig:
    """The generation config a call starts from (its keyword arguments override its fields)."""
    given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    return given if given is not None else model.generation_config


def _capacity(model: GenerationMixin, config: GenerationConfig, args: tuple, kwargs: dict[str, Any]) -> int:
    """Tokens per sequence to size the cache for: the prompt and the tokens generated after it (max_new_tokens,
    else max_length less the prompt), of which at most `PREALLOCATED_NEW_TOKENS` and none past the model's
    max_position_embeddings (a prompt that reaches it gets no room): `generate(max_new_tokens=10**8)` must not
    preallocate gigabytes it will never fill. A cache grows in place past it. 0: nothing known."""
    prompt = args[0] if args and args[0] is not None else next(
        (kwargs[name] for name in ("inputs", "input_ids", "inputs_embeds") if kwargs.get(name) is not None), None)
    length = prompt.shape[1] if prompt is not None and prompt.dim() >= 2 else 0
    new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new_tokens is None:
        new_tokens = max(0, (kwargs.get("max_length", config.max_length) or 0) - length)
    room = min(new_tokens, PREALLOCATED_NEW_TOKENS)
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if positions is not None:
        room = min(room, max(0, positions - length))
    return length + room
