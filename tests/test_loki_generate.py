"""`generate` on a Loki-patched model runs on a `LokiCache` handed through generate's public cache argument, on every
supported transformers release; in mode "decode" any other cache fails loudly instead of leaving the fast path."""
from __future__ import annotations

import copy

import pytest
import torch
from loki_helpers import PLAIN, output_cache, random_basis, tiny_model
from transformers import DynamicCache, StoppingCriteria
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS, ALL_STATIC_CACHE_IMPLEMENTATIONS
from transformers.utils import is_optimum_quanto_available

from hf_patch import LokiCache, patch_loki, unpatch
from hf_patch import generation as hf_generation
from hf_patch.generation import CACHE_KWARG, PREALLOCATED_NEW_TOKENS
from hf_patch.loki.arch import loki_layers
from hf_patch.loki import generate as loki_generate
from hf_patch.loki.cache import GROWTH


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


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 prompts of 14 tokens (ids, attention mask): the second left-padded by 5 tokens, or neither (then
    Transformers hands a static cache's prefill no mask at all)."""
    x = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    if padded:
        x[1, :5], mask[1, :5] = 0, 0
    return x, mask


def greedy(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy sequences [B, T + 6] and the scores of each step [6, B, V]."""
    out = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


def skip_unless_runnable(implementation: str) -> None:
    """Skip cache kinds this machine cannot build for any model (not hf-patch's doing)."""
    if "offloaded" in implementation and not torch.cuda.is_available():
        pytest.skip(f"cache_implementation={implementation!r} offloads to an accelerator's memory, none here")
    if implementation == "quantized" and not is_optimum_quanto_available():
        pytest.skip("cache_implementation='quantized' needs its default backend, optimum-quanto (not installed)")


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("implementation", ALL_CACHE_IMPLEMENTATIONS)
def test_every_cache_kind_at_full_budget_is_the_unpatched_model(implementation, padded):
    """d_frac = k_frac = 1 is full attention on whatever cache generate builds: mode "all" gives the unpatched
    model's tokens and scores with that cache kind (a static cache's prefill has more keys than rows, its empty slots
    after them, and unpadded no mask); mode "decode" refuses every kind up front (it runs on a LokiCache only)."""
    skip_unless_runnable(implementation)
    x, mask = prompts(padded)
    reference = tiny_model("llama", seed=3)
    ref_tokens, ref_scores = greedy(reference, x, mask, cache_implementation=implementation)
    for mode in ("all", "decode"):
        model = tiny_model("llama", seed=3)
        patch_loki(model, random_basis(seed=2), d_frac=1.0, k_frac=1.0, mode=mode, **PLAIN)
        if mode == "decode":
            with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' would have generate build "
                                                 "its own cache, but LlamaForCausalLM.generate runs on a LokiCache"):
                greedy(model, x, mask, cache_implementation=implementation)
            continue
        tokens, scores = greedy(model, x, mask, cache_implementation=implementation)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "kernels"])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_a_static_cache_under_a_budget_is_the_default_cache(padded, kernels, monkeypatch):
    """Mode "all" at (0.5, 0.5), nothing protected: every static cache kind gives what the default LokiCache gives
    (the PyTorch path; the prefill kernels under the Triton interpreter, slow, on "static" only, which the
    deprecated static kinds build too): its empty slots are never selected."""
    x, mask = prompts(padded)
    model = tiny_model("llama", seed=3)
    patch_loki(model, random_basis(seed=2), d_frac=0.5, k_frac=0.5, mode="all", sink_tokens=0, recent_tokens=0,
               dense_layers=0)
    for layer in loki_layers(model):
        layer.prefill_kernels_on_cpu = kernels  # the prefill kernels on CPU tensors too (Triton's interpreter)
    ref_tokens, ref_scores = greedy(model, x, mask)
    full_tokens, full_scores = greedy(tiny_model("llama", seed=3), x, mask)
    assert (ref_scores - full_scores).abs().max() > 0.1  # the budget drops keys that matter
    for implementation in ("static",) if kernels else ALL_STATIC_CACHE_IMPLEMENTATIONS:
        if "offloaded" in implementation and not torch.cuda.is_available():
            continue
        tokens, scores = greedy(model, x, mask, cache_implementation=implementation)
        assert torch.equal(tokens, ref_tokens), implementation
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5, msg=implementation)


def test_paged_cache_is_refused_up_front():
    """cache_implementation="paged" has generate switch to continuous batching, which runs its own paged attention
    (not Loki's): refused, in either mode, before any generation."""
    x, mask = prompts(True)
    for mode in ("all", "decode"):
        model = tiny_model("llama", seed=3)
        patch_loki(model, random_basis(seed=2), d_frac=1.0, k_frac=1.0, mode=mode, **PLAIN)
        with pytest.raises(ValueError, match="cache_implementation='paged' has generate switch to continuous "
                                             r"batching.*drop cache_implementation \(generate then runs on a LokiCache"):
            model.generate(x, attention_mask=mask, max_new_tokens=2, cache_implementation="paged")


class StopAfter(StoppingCriteria):
    """Stop once the sequences hold `length` tokens (max_new_tokens stays huge: it decides the cache's size)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def rounded(tokens: int) -> int:
    return -(-tokens // GROWTH) * GROWTH


@pytest.mark.parametrize("mode", ["decode", "all"])
def test_a_huge_max_new_tokens_preallocates_only_what_can_be_used(mode):
    """generate(max_new_tokens=10**8) sizes its LokiCache by the model's positions (512 here), and with more positions
    than that by PREALLOCATED_NEW_TOKENS past the prompt; the output is what a short generation gives."""
    model, x = patched(mode), ids(20)
    want = model.generate(x, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    out = model.generate(x, max_new_tokens=10**8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         stopping_criteria=[StopAfter(25)])
    assert output_cache(out).capacity() == 512  # max_position_embeddings
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), rtol=0, atol=0)
    long_model = patched(mode, max_position_embeddings=10**6)
    out = long_model.generate(x, max_new_tokens=10**8, do_sample=False, return_dict_in_generate=True,
                              stopping_criteria=[StopAfter(25)])
    assert output_cache(out).capacity() == rounded(20 + PREALLOCATED_NEW_TOKENS)
    assert torch.equal(out.sequences, want.sequences)


def test_a_cache_sized_below_the_generation_grows_in_place_to_the_same_output(monkeypatch):
    """Past its preallocated room the LokiCache grows in place: 30 tokens generated after a 250-token prompt in a
    cache sized for 254 (256 allocated) give what a cache sized for all of them gives."""
    model, x = patched("decode", max_position_embeddings=1024), ids(250)
    want = model.generate(x, max_new_tokens=30, do_sample=False, output_scores=True, return_dict_in_generate=True,
                          **{CACHE_KWARG: LokiCache(model, capacity=512)})
    monkeypatch.setattr(hf_generation, "PREALLOCATED_NEW_TOKENS", 4)
    small = model.generate(x, max_new_tokens=30, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cache = output_cache(small)
    assert cache.layers[0].capacity_hint == 254 and cache.capacity() == 512  # grew past rounded(254) = 256
    assert torch.equal(small.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(small.scores), torch.stack(want.scores), rtol=0, atol=0)
