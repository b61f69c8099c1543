"""Loki decode steps as CUDA graphs: the device-steps step against the eager one, which calls it serves, errors.

Without a GPU the step's body runs eagerly on the CPU (the runner's `run_on_cpu`): the same cache mode, bounds and
host logic, no capture. On a GPU the same tests capture and replay real graphs.
"""
from __future__ import annotations

import pytest
import torch
from loki_helpers import PLAIN, output_cache, random_basis, tiny_model, with_cache

from hf_patch import LokiCache, is_patched, patch_loki, unpatch
from hf_patch.kernels import loki as loki_kernels
from hf_patch.kernels.loki import DecodeWorkspace
from hf_patch.loki.cache import APPROX_KEYS, DeviceSteps
from hf_patch.loki.cuda_graph import DecodeGraphs, decode_graphs, left_padding_start

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def patch_graphed(model, *args, **kwargs) -> None:
    """`patch_loki`; with cuda_graph=True, its graph runner serves CPU steps too, running their body eagerly
    (without a GPU)."""
    patch_loki(model, *args, **kwargs)
    runner = decode_graphs(model)
    if runner is not None:
        runner.run_on_cpu = DEVICE == "cpu"


@pytest.fixture
def steps(monkeypatch) -> list:
    """Every graphed step taken (the CPU runs the graph body eagerly)."""
    calls = []
    original = DecodeGraphs.step

    def step(self, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(self, **kwargs)

    monkeypatch.setattr(DecodeGraphs, "step", step)
    return calls


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(3, 97, (3, 30), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(x)
    mask[1, :11] = 0  # left padding, as for generation
    mask[2, :29] = 0
    return x.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("budget", [PLAIN, {**PLAIN, "sink_tokens": 2, "recent_tokens": 3, "dense_layers": [1]}])
@pytest.mark.parametrize("gqa_select", ["query", "group"])
def test_graphed_generate_equals_eager(steps, gqa_select, budget):
    model = tiny_model("llama", seed=4).to(DEVICE)
    x, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    patch_loki(model, random_basis(seed=5), d_frac=0.5, k_frac=0.3, gqa_select=gqa_select, **budget)
    ref = model.generate(x, **kwargs)
    patch_graphed(model, random_basis(seed=5), d_frac=0.5, k_frac=0.3, gqa_select=gqa_select, cuda_graph=True, **budget)
    out = model.generate(x, **kwargs)
    assert len(steps) == 11 and all(shape == (3, 1) for shape in steps)  # every decode step, not the prefill
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.scores, ref.scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert output_cache(out).get_seq_length() == 30 + 11
    if DEVICE == "cuda":
        assert decode_graphs(model).captures == 1


def test_steps_whose_budget_keeps_every_key_attend_densely(steps, monkeypatch):
    """Decode steps over at most `min_tokens` keys keep every key: they run the dense step (nothing scored), the
    later ones Loki, graphed as eager; a graph captured for dense steps is not replayed for sparse ones; with
    every step under min_tokens the patched model generates what the unpatched one does."""
    model = tiny_model("llama", seed=4).to(DEVICE)
    x, mask = padded_batch()  # 30 tokens: the 11 decode steps hold 31 .. 41 keys
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    full = model.generate(x, **kwargs)
    dense = []
    original = loki_kernels.dense_decode_attention
    monkeypatch.setattr(loki_kernels, "dense_decode_attention", lambda q, k, *a, **kw: dense.append(k.shape[2]) or
                        original(q, k, *a, **kw))
    runs = {}
    for graph in (False, True):
        dense.clear()
        patch_graphed(model, random_basis(seed=5), d_frac=0.25, k_frac=0.25, cuda_graph=graph, min_tokens=36, **PLAIN)
        runs[graph] = model.generate(x, **kwargs)
        if graph and DEVICE == "cuda":  # replays run no Python: the dense step ran at warm-up and capture only
            assert len(dense) == 2 * 2 and decode_graphs(model).captures == 2  # the dense steps' graph, the sparse
        else:
            assert len(dense) == 6 * 2  # steps holding 31 .. 36 keys, 2 layers
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for got, want in zip(runs[True].scores, runs[False].scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(runs[False].scores, full.scores))
    patch_graphed(model, random_basis(seed=5), d_frac=0.25, k_frac=0.25, cuda_graph=True, min_tokens=64, **PLAIN)
    dense.clear()
    out = model.generate(x, **kwargs)
    assert len(dense) == (2 if DEVICE == "cuda" else 11) * 2 and torch.equal(out.sequences, full.sequences)
    for got, want in zip(out.scores, full.scores):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    unpatch(model)


def test_token_budget_in_graphed_steps(steps, monkeypatch):
    """k_frac = 1, k_tokens = 34 on the padded batch (its 11 decode steps hold 31 .. 41 keys; sequences 1 and 2 see
    11 and 29 fewer): steps over at most 34 cached keys attend densely (`dense_up_to` = 34), the later ones keep at
    most 34 keys per sequence, counted from kv_end - kv_start (the device-steps bounds) with the cap applied there
    (k_b = [34, 30, 12] at the last step); graphed = eager, and the cap changed sequence 0's generation."""
    model = tiny_model("llama", seed=4).to(DEVICE)
    x, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    full = model.generate(x, **kwargs)
    dense, kept = [], []
    original_dense, original_loki = loki_kernels.dense_decode_attention, loki_kernels.loki_decode_attention
    monkeypatch.setattr(loki_kernels, "dense_decode_attention", lambda q, k, *a, **kw: dense.append(k.shape[2]) or
                        original_dense(q, k, *a, **kw))
    monkeypatch.setattr(loki_kernels, "loki_decode_attention", lambda *a, **kw: kept.append((kw["k"], kw["k_b"])) or
                        original_loki(*a, **kw))
    runs = {}
    for graph in (False, True):
        dense.clear()
        kept.clear()
        patch_graphed(model, random_basis(seed=5), d_frac=0.25, k_frac=1.0, k_tokens=34, cuda_graph=graph, **PLAIN)
        runs[graph] = model.generate(x, **kwargs)
        if not graph or DEVICE == "cpu":  # (replays run no Python)
            assert len(dense) == 4 * 2  # steps holding 31 .. 34 keys, 2 layers
            assert kept[-1][0] == 34 and kept[-1][1].tolist() == [34, 30, 12]
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for got, want in zip(runs[True].scores, runs[False].scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert max(float((a[0] - b[0]).abs().max()) for a, b in zip(runs[True].scores, full.scores)) > 1e-3


def test_growing_cache_captures_again_and_matches_eager_loop(steps):
    """A manual loop on a LokiCache that starts small: each reallocation needs a new graph; the logits equal
    those of the same loop without graphs at every step."""
    model = tiny_model("llama", seed=2).to(DEVICE)
    prompt = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    nxt = torch.randint(3, 97, (300, 2, 1), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits, capacities, caches = {}, set(), {}
    for graph in (False, True):
        patch_graphed(model, random_basis(seed=6), d_frac=0.25, k_frac=0.25, cuda_graph=graph, **PLAIN)
        cache = LokiCache(model)
        with torch.no_grad():
            model(prompt, **with_cache(cache))
            rows = []
            for token in nxt:
                rows.append(model(token, **with_cache(cache)).logits[:, -1])
                capacities.add(cache.capacity())
        logits[graph], caches[graph] = torch.stack(rows), cache
    assert len(steps) == 300 and len(capacities) >= 2  # grew during the loop (256, then 384)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    if DEVICE == "cuda":
        assert decode_graphs(model).captures == len(capacities)
    for eager, graphed in zip(caches[False].layers, caches[True].layers):  # the cache's views count graphed steps
        assert graphed.keys.shape[2] == graphed.values.shape[2] == 310
        torch.testing.assert_close(graphed.keys, eager.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graphed.values, eager.values, atol=1e-5, rtol=1e-5)
        assert torch.equal(getattr(graphed.keys, APPROX_KEYS), graphed.keys[..., :8])


def test_a_cast_model_gets_a_new_graph(steps):
    """Casting replaces the weights a captured graph reads: they are part of what a graph is captured for."""
    model = tiny_model("llama").to(DEVICE)
    patch_graphed(model, random_basis(), cuda_graph=True)
    graphs = decode_graphs(model)
    before = graphs.weights_key()
    cache = LokiCache(model)
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6]], device=DEVICE), **with_cache(cache))
        model(torch.tensor([[7]], device=DEVICE), **with_cache(cache))
        assert graphs.captured.key[3] == before == graphs.weights_key()
        model.to(torch.bfloat16)
        assert graphs.weights_key() != before
        cache = LokiCache(model)
        model(torch.tensor([[4, 5, 6]], device=DEVICE), **with_cache(cache))
        out = model(torch.tensor([[7]], device=DEVICE), **with_cache(cache))
    assert graphs.captured.key[3] == graphs.weights_key() and out.logits.dtype == torch.bfloat16


def test_calls_a_graph_cannot_serve_run_the_ordinary_forward(steps):
    model = tiny_model("llama").to(DEVICE)
    patch_graphed(model, random_basis(), cuda_graph=True)
    cache = LokiCache(model)
    token = torch.tensor([[5]], device=DEVICE)
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6]], device=DEVICE), **with_cache(cache))  # several tokens: prefill
        hidden = model(token, **with_cache(cache), output_hidden_states=True)  # hidden states asked for
        model(token, **with_cache(None))  # no Loki cache
    model(token, **with_cache(cache))  # gradients on
    assert steps == [] and hidden.hidden_states is not None and cache.get_seq_length() == 5
    with torch.no_grad():
        model(token, **with_cache(cache))
    assert len(steps) == 1 and cache.get_seq_length() == 6


def test_mask_that_is_not_left_padding_is_refused(steps):
    model = tiny_model("llama").to(DEVICE)
    patch_graphed(model, random_basis(), cuda_graph=True)
    cache = LokiCache(model)
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6, 7]], device=DEVICE), **with_cache(cache))
        holes = torch.tensor([[1, 0, 1, 1, 1]], device=DEVICE)
        with pytest.raises(ValueError, match="left padding"):
            model(torch.tensor([[5]], device=DEVICE), **with_cache(cache), attention_mask=holes)
        with pytest.raises(ValueError, match="cache length \\+ 1 = 5"):
            model(torch.tensor([[5]], device=DEVICE), **with_cache(cache), attention_mask=holes[:, :4])


def test_decode_kernels_use_their_owners_workspace(steps, monkeypatch):
    """Eager steps run the decode kernels on the cache's workspace; graphed steps on their captured step's own (its
    graph replays into those buffers, which live with it), a new capture on a new one; no call goes without."""
    model = tiny_model("llama").to(DEVICE)
    used = []
    original = loki_kernels.loki_decode_attention
    monkeypatch.setattr(loki_kernels, "loki_decode_attention",
                        lambda *a, **kw: used.append(kw["workspace"]) or original(*a, **kw))
    prompt, token = torch.tensor([[4, 5, 6, 7, 8]], device=DEVICE), torch.tensor([[9]], device=DEVICE)
    patch_graphed(model, random_basis(), **PLAIN)
    cache = LokiCache(model)
    with torch.no_grad():
        model(prompt, **with_cache(cache))
        model(token, **with_cache(cache))
        assert len(used) == 2 and all(w is cache.workspace for w in used)  # one call per layer
        patch_graphed(model, random_basis(), cuda_graph=True, **PLAIN)
        used.clear()
        model(token, **with_cache(cache))
        model(token, **with_cache(cache))
        first = decode_graphs(model).captured
        other = LokiCache(model, capacity=512)  # another capacity: another capture
        model(prompt, **with_cache(other))
        model(token, **with_cache(other))
    second = decode_graphs(model).captured
    assert len(steps) == 3 and second is not first
    owners = {id(first.steps.workspace), id(second.steps.workspace)}
    assert len(owners) == 2 and id(cache.workspace) not in owners and id(other.workspace) not in owners
    assert used and {id(w) for w in used} == owners


def test_left_padding_start():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert left_padding_start(mask, 3, 4).tolist() == [0, 2, 4]
    assert left_padding_start(mask, 3, 4).dtype == torch.int32
    assert left_padding_start(None, 3, 4) is None


def test_device_steps_take_one_token():
    model = tiny_model("llama")
    patch_loki(model, random_basis())
    cache = LokiCache(model, capacity=16)
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6]]), **with_cache(cache))
    zero = torch.zeros(1, dtype=torch.int32)
    cache.set_device_steps(DeviceSteps(torch.tensor([3]), zero, zero, DecodeWorkspace()))
    with pytest.raises(ValueError, match="one token per sequence"):
        cache.layers[0].update(torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16))


def test_graphs_need_a_causal_lm():
    model = tiny_model("llama").model  # the base model (AutoModel): no LM head, no logits, no generate
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        patch_loki(model, random_basis(), cuda_graph=True)
    assert not is_patched(model)  # refused before any change
    patch_loki(model, random_basis())  # without graphs a base model patches and runs
    with torch.no_grad():
        assert model(torch.tensor([[4, 5, 6]])).last_hidden_state.shape == (1, 3, 64)


def test_patch_and_unpatch_install_and_remove_the_graphs():
    model = tiny_model("llama")
    forward = model.forward
    patch_loki(model, random_basis(), cuda_graph=True)
    first = decode_graphs(model)
    assert first is not None and model.forward.__wrapped__ == forward
    patch_loki(model, random_basis(), cuda_graph=True)  # new settings: graphs of the old ones must not replay
    assert decode_graphs(model) is not first and model.forward.__wrapped__ == forward
    patch_loki(model, random_basis())
    assert decode_graphs(model) is None
    patch_loki(model, random_basis(), cuda_graph=True)
    unpatch(model)
    assert decode_graphs(model) is None and "forward" not in model.__dict__
