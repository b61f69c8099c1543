"""TransNormer decode steps as CUDA graphs: graphed generation against eager generation, which calls the graph
serves, and states kept per cache.

Without a GPU the step's body runs eagerly on the CPU (`run_on_cpu`): the same device position, in-place states
and host logic, no capture. On a GPU the same tests capture and replay real graphs.
"""
from __future__ import annotations

import pytest
import torch

from hf_patch.generation import CACHE_KWARG
from hf_patch.transnormer import TransNormerCache, TransNormerConfig, TransNormerForCausalLM
from hf_patch.transnormer.cuda_graph import (
    TransNormerGraphs,
    decode_graphs,
    disable_graph_decoding,
    enable_graph_decoding,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"  # graphed steps run their body eagerly (`enable_graph_decoding(..., run_on_cpu=True)`)
TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            initializer_range=0.3, lrpe_layers=[0, 2])


def tiny_model(seed: int = 0) -> TransNormerForCausalLM:
    torch.manual_seed(seed)
    model = TransNormerForCausalLM(TransNormerConfig(**TINY)).eval().to(DEVICE)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture
def steps(monkeypatch) -> list:
    """The batch shape of every graphed step taken (the CPU runs the graph body eagerly)."""
    calls = []
    original = TransNormerGraphs.step

    def step(self, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(self, **kwargs)

    monkeypatch.setattr(TransNormerGraphs, "step", step)
    return calls


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, TINY["vocab_size"], (3, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :12] = 0
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def test_graphed_generation_equals_eager(steps):
    """Left-padded batch, LRPE layers (they read the position from the device): the same tokens and scores as
    eager generation, every decode step graphed, twice in a row (a new cache: a new capture, and the first
    generation's cache is not written by the second)."""
    model = tiny_model()
    ids, mask = padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    ref = model.generate(ids, **kwargs)
    enable_graph_decoding(model, run_on_cpu=ON_CPU)
    outs = [model.generate(ids, **kwargs) for _ in range(2)]
    assert steps == [(3, 1)] * 18  # 9 decode steps per generation, the prefills not
    for out in outs:
        assert torch.equal(out.sequences, ref.sequences)
        for got, want in zip(out.scores, ref.scores):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    first, second = (getattr(o, CACHE_KWARG) for o in outs)
    assert first.get_seq_length() == second.get_seq_length() == 14 + 9
    for a, b in zip(first.states, second.states):
        assert a.data_ptr() != b.data_ptr() and torch.allclose(a, b, atol=1e-6)
    if DEVICE == "cuda":
        assert decode_graphs(model).captures == 2
    disable_graph_decoding(model)
    assert decode_graphs(model) is None and model.generate(ids, **kwargs).sequences.equal(ref.sequences)


def test_manual_loop_matches_eager_and_full_forward(steps):
    """A manual loop with a TransNormerCache: graphed logits equal eager ones and the full forward's at every
    step; the cache's host count and states advance as eagerly."""
    model = tiny_model(seed=1)
    ids = torch.randint(1, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        full = model(ids).logits
        rows, caches = {}, {}
        for graph in (False, True):
            if graph:
                enable_graph_decoding(model, run_on_cpu=ON_CPU)
            cache = TransNormerCache(TINY["num_hidden_layers"])
            model(ids[:, :10], past_key_values=cache, use_cache=True)
            rows[graph] = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10, 30)], 1)
            caches[graph] = cache
    assert len(steps) == 20
    torch.testing.assert_close(rows[True], rows[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[True], full[:, 10:], atol=1e-4, rtol=1e-4)
    assert caches[True].get_seq_length() == caches[False].get_seq_length() == 30
    for a, b in zip(caches[True].states, caches[False].states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_calls_a_graph_cannot_serve_run_the_ordinary_forward(steps):
    """Prefill, several tokens, hidden states asked for, gradients, no cache: the ordinary forward."""
    model = enable_graph_decoding(tiny_model(), run_on_cpu=ON_CPU)
    ids = torch.randint(1, TINY["vocab_size"], (2, 8)).to(DEVICE)
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_KWARG)
        model(ids[:, :2], past_key_values=cache)
        model(ids[:, :1], past_key_values=cache, output_hidden_states=True)
        model(ids[:, :1])
    model(ids[:, :1], past_key_values=cache)  # gradients enabled
    assert steps == []
    with torch.no_grad():
        model(ids[:, :1], past_key_values=cache)
    assert steps == [(2, 1)]


def test_enable_takes_a_transnormer_lm_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(TypeError, match="TransNormerForCausalLM"):
        enable_graph_decoding(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, vocab_size=40)))
