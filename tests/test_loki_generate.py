"""`generate` on a Loki-patched model runs on a `LokiCache` handed through generate's public cache argument, on every
supported transformers release; in mode "decode" any other cache fails loudly instead of leaving the fast path."""
from __future__ import annotations

import copy

import pytest
import torch
from loki_helpers import PLAIN, output_cache, random_basis, tiny_model
from transformers import DynamicCache

from hf_patch import LokiCache, patch_loki, unpatch
from hf_patch.generation import CACHE_KWARG
from hf_patch.loki import generate as loki_generate


def ids(length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def patched(mode: str = "decode", **config) -> torch.nn.Module:
    model = tiny_model("llama", seed=3, **config)
    patch_loki(model, random_basis(seed=2), d_frac=0.5, k_frac=0.3, mode=mode, **PLAIN)
    return model


def test_generate_builds_a_loki_cache_sized_for_the_generation():
    model, x = patched("decode", max_position_embeddings=1024), ids(740)
    out = model.generate(x, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    assert isinstance(cache, LokiCache) and cache.get_seq_length() == 740 + 40 - 1
    # sized once for prompt + new tokens (780 -> 1024, in steps of 256); sized for the prompt alone (768), it would
    # have grown by half at the 769th token (1152 -> 1280)
    assert cache.capacity() == 1024


def test_generate_takes_a_loki_cache_under_either_name():
    model, x = patched(), ids()
    ref = model.generate(x, max_new_tokens=6, do_sample=False)
    for name in ("cache", "past_key_values"):
        mine = LokiCache(model)
        out = model.generate(x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **{name: mine})
        assert output_cache(out) is mine and torch.equal(out.sequences, ref), name
    with pytest.raises(ValueError, match="pass the cache once"):
        model.generate(x, max_new_tokens=2, cache=LokiCache(model), past_key_values=LokiCache(model))


def test_decode_mode_refuses_any_other_cache_up_front():
    model, x = patched("decode"), ids()
    with pytest.raises(ValueError, match="runs on a LokiCache, got a DynamicCache"):
        model.generate(x, max_new_tokens=2, **{CACHE_KWARG: DynamicCache(config=model.config)})
    with pytest.raises(ValueError, match="cache_implementation='static'.*LokiCache"):
        model.generate(x, max_new_tokens=2, cache_implementation="static")


def test_mode_all_generates_on_other_caches_too():
    """Mode "all" runs Loki on every row, whatever holds the keys: another cache is slower, not different."""
    model, x = patched("all"), ids()
    ref = model.generate(x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(ref), LokiCache)  # the default, as in mode "decode"
    ref = ref.sequences
    dynamic = model.generate(x, max_new_tokens=6, do_sample=False, **{CACHE_KWARG: DynamicCache(config=model.config)})
    assert torch.equal(dynamic, ref)


def test_decode_mode_fails_loudly_if_generate_runs_on_another_cache(monkeypatch):
    """A release that ignores the cache it is handed (here: dropped on the way) would have generate build a
    DynamicCache, and every decode step would leave the fast path unnoticed: the first forward raises instead."""
    model, x = patched("decode"), ids()
    real = loki_generate.generate_kwargs

    def ignored(*args, **kwargs):
        call, cache = real(*args, **kwargs)
        return {name: value for name, value in call.items() if value is not cache}, cache

    monkeypatch.setattr(loki_generate, "generate_kwargs", ignored)
    with pytest.raises(RuntimeError, match="not a LokiCache"):
        model.generate(x, max_new_tokens=3, do_sample=False)
    monkeypatch.undo()
    # the check is generate's only: a manual loop may still run on a DynamicCache
    with torch.no_grad(), pytest.warns(UserWarning, match="attends densely"):  # a prefill: dense, as always
        model(x, **{CACHE_KWARG: DynamicCache(config=model.config)})
    assert torch.equal(model.generate(x, max_new_tokens=3, do_sample=False)[:, :20], x)


def test_generate_without_a_cache_is_allowed_and_unpatch_restores_generate():
    model, x = patched("decode"), ids()
    with pytest.warns(UserWarning, match="attends densely"):  # use_cache=False: no cache, nothing to check
        model.generate(x, max_new_tokens=2, do_sample=False, use_cache=False)
    twin = copy.deepcopy(model)  # the copy's generate drives the copy, not the original
    assert twin.generate.args[0] is twin
    unpatch(model)
    assert "generate" not in model.__dict__
    assert isinstance(output_cache(model.generate(x, max_new_tokens=2, return_dict_in_generate=True)), DynamicCache)
