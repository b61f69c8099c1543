"""The whole-step greedy loop (`hf_patch.decode_loop`, `DecodeGraphs.greedy_generate`): the sequences of
Transformers' `generate`, bit for bit, with no read of the device per token; the calls it does not take fall back.

Without a GPU the step's body runs eagerly on the CPU (the runner's `run_on_cpu`); on a GPU the same tests capture and replay
real graphs. The reference is the same patched model with `whole_step` off: Transformers' own loop over the same
graphed forward, so the logits of every step are the same and the tokens must be too.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from loki_helpers import PLAIN, random_basis, tiny_model, with_cache

from hf_patch import LokiCache, patch_loki
from hf_patch.decode_loop import greedy_call
from hf_patch.loki.cuda_graph import DecodeGraphs, decode_graphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOKI = dict(d_frac=0.5, k_frac=0.3, mode="decode", **PLAIN)
DENSE = dict(k_frac=1.0, sink_tokens=0, recent_tokens=0, dense_layers=0, mode="decode")  # full attention, in place
NEW = 30  # not a multiple of the ring (16, 5)


@pytest.fixture
def loops(monkeypatch) -> list:
    """Every whole-step loop run (`patched` has the CPU run the graph body eagerly)."""
    calls = []
    original = DecodeGraphs.greedy_generate

    def greedy_generate(self, *args, **kwargs):
        calls.append(self.check_every)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecodeGraphs, "greedy_generate", greedy_generate)
    return calls


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(x)
    mask[1, :9] = 0  # left padding
    return x.to(DEVICE), mask.to(DEVICE)


def patched(budget: dict) -> torch.nn.Module:
    """A tiny Llama with GQA (4 query heads, 2 KV heads), patched with graphed steps (run eagerly on the CPU)."""
    model = patch_loki(tiny_model("llama", seed=4).to(DEVICE), random_basis(seed=5), cuda_graph=True, **budget)
    decode_graphs(model).run_on_cpu = DEVICE == "cpu"
    return model


def reference(model, x, **kwargs) -> torch.Tensor:
    """Transformers' generate over the same graphed forward (the whole-step loop off)."""
    decode_graphs(model).whole_step = False
    try:
        return model.generate(x, **kwargs)
    finally:
        decode_graphs(model).whole_step = True


def first_eos(tokens: torch.Tensor, eos: set[int]) -> int | None:
    """Index of the first of `eos` among a row's generated tokens (None: never)."""
    return next((i for i, t in enumerate(tokens.tolist()) if t in eos), None)


def pick_eos(free: torch.Tensor, both: bool) -> tuple[list[int], list[int | None]]:
    """End-of-sequence tokens the model really generates (found in its generation without any, `free` [2, NEW]):
    both rows end, at different steps, early enough for the loop to stop before max_new_tokens (both), or only
    row 1 does (not both). Returns them and where each row ends (0: at the first token, which the prefill gives)."""
    for a, b in itertools.product(free[0, 1:12].tolist(), free[1, 1:14].tolist()):
        eos = {a, b} if both else {b}
        ends = [first_eos(free[0], eos), first_eos(free[1], eos)]
        if both and None not in ends and ends[0] != ends[1] and max(ends) < 15:
            return sorted(eos), ends
        if not both and ends[0] is None and ends[1] is not None:
            return sorted(eos), ends
    raise AssertionError(f"no end-of-sequence token fits the test in {free.tolist()}")


@pytest.mark.parametrize("case", ["one row ends", "both end", "both end, min_new_tokens"])
@pytest.mark.parametrize(("budget", "check_every"), [(LOKI, 16), (DENSE, 5)], ids=["loki", "dense"])
def test_whole_step_loop_generates_what_generate_does(loops, budget, case, check_every):
    model = patched(budget)
    decode_graphs(model).check_every = check_every
    x, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    free = reference(model, x, **kwargs)
    assert free.shape == (2, 24 + NEW) and torch.equal(model.generate(x, **kwargs), free)  # no eos: every token
    eos, ends = pick_eos(free[:, 24:].cpu(), both=case != "one row ends")
    kwargs["eos_token_id"] = eos
    if "min_new_tokens" in case:
        kwargs["min_new_tokens"] = ends[0] + 2  # row 0's end is banned: it goes on
    want = reference(model, x, **kwargs)
    loops.clear()
    got = model.generate(x, **kwargs)
    assert loops == [check_every]
    assert got.dtype == want.dtype and torch.equal(got, want)
    if case == "both end":  # stopped after the last end, the other row padded from its end on
        first = min(range(2), key=ends.__getitem__)
        assert want.shape == (2, 24 + max(ends) + 1) and (want[first, 24 + ends[first] + 1 :] == 0).all()
    if case == "one row ends":
        assert want.shape == (2, 24 + NEW) and (want[1, 24 + ends[1] + 1 :] == 0).all()


def test_whole_step_loop_leaves_a_given_cache_where_generate_does(loops):
    """The steps run past the last sequence's end (up to a ring) are dropped from the cache."""
    model = patched(DENSE)
    x, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eos, ends = pick_eos(reference(model, x, **kwargs)[:, 24:].cpu(), both=True)
    lengths = []
    for whole_step in (False, True):
        decode_graphs(model).whole_step = whole_step
        cache = LokiCache(model)
        out = model.generate(x, eos_token_id=eos, **kwargs, **with_cache(cache))
        lengths.append((out.shape[1], cache.get_seq_length()))
    assert len(loops) == 1 and lengths[0] == lengths[1] == (24 + max(ends) + 1, 24 + max(ends))


def test_prompt_without_mask_gets_the_mask_generate_infers(loops):
    """No attention_mask: generate masks the pad tokens of the prompt (pad not an eos token); so does the loop."""
    model = patched(DENSE)
    x, _ = batch()
    x[1, :9] = 0
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    want = reference(model, x, **kwargs)
    assert torch.equal(model.generate(x, **kwargs), want) and len(loops) == 1
    patched_mask = torch.ones_like(x)
    patched_mask[1, :9] = 0
    assert torch.equal(want, reference(model, x, attention_mask=patched_mask, **kwargs))  # it was inferred


def test_the_loop_reads_the_device_once_per_ring_not_per_token(loops, monkeypatch):
    """Host syncs outside the step body (which a graph replays without Python): `.item()`, `bool()`, `.tolist()`,
    `.cpu()` and the like are counted. Transformers' loop syncs every token; the whole-step loop once per ring
    (finished.all()) and at the start and end, however many tokens."""
    model = patched(DENSE)
    x, mask = batch()
    decode_graphs(model).check_every = 4
    body_depth, syncs, checks = [0], [0], [0]
    body = DecodeGraphs._body

    def counted_body(self, *args):
        body_depth[0] += 1
        try:
            return body(self, *args)
        finally:
            body_depth[0] -= 1

    monkeypatch.setattr(DecodeGraphs, "_body", counted_body)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__"):
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            if body_depth[0] == 0:
                syncs[0] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    from hf_patch import decode_loop

    all_finished = decode_loop.all_finished
    monkeypatch.setattr(decode_loop, "all_finished", lambda state: checks.__setitem__(0, checks[0] + 1) or
                        all_finished(state))

    def count(new_tokens: int, **kwargs) -> tuple[int, int]:
        syncs[0] = checks[0] = 0
        model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        return syncs[0], checks[0]

    # an eos token the model does not generate here: every step runs, the loop checks once per ring
    free = reference(model, x, attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0)
    never = min(set(range(3, 97)) - set(free[:, 24:].flatten().tolist()))
    (short, short_checks), (long, long_checks) = count(13, eos_token_id=never), count(25, eos_token_id=never)
    assert (short_checks, long_checks) == (1 + 3, 1 + 6)  # at the start, then after steps 4, 8, ... (12 or 24 run)
    assert long - short == long_checks - short_checks  # nothing else grows with the tokens
    assert count(13) == count(25, min_new_tokens=3) and checks[0] == 0  # no eos: no check at all
    decode_graphs(model).whole_step = False
    assert count(25, eos_token_id=never)[0] - count(13, eos_token_id=never)[0] >= 12  # generate: one or more a token
    assert len(loops) == 4


@pytest.mark.parametrize("change", [
    dict(do_sample=True), dict(num_beams=2), dict(output_scores=True, return_dict_in_generate=True),
    dict(return_dict_in_generate=True), dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
    dict(min_length=28), dict(stop_strings=["ab"]), dict(max_new_tokens=None, max_length=40),
    dict(suppress_tokens=[5]), dict(renormalize_logits=True), dict(position_ids=torch.zeros(1, 24, dtype=torch.long)),
    dict(logits_processor=[lambda ids, scores: scores]), dict(num_return_sequences=2), dict(use_cache=False),
])
def test_calls_the_loop_does_not_reproduce_fall_back(change):
    model = patched(LOKI)
    x, _ = batch()
    kwargs = {**dict(max_new_tokens=8, do_sample=False), **change}
    assert greedy_call(model, (x,), kwargs) is None
    assert greedy_call(model, (x, model.generation_config), dict(max_new_tokens=8)) is None  # a config object
    call = greedy_call(model, (x,), dict(max_new_tokens=8, do_sample=False, temperature=0.5, top_k=3))
    assert call is not None and call.max_new_tokens == 8 and call.first_kwargs["max_new_tokens"] == 1


def test_mode_all_on_another_cache_runs_transformers_generate(loops):
    """Mode "all" generates on any cache; the loop steps a LokiCache only."""
    from transformers import DynamicCache

    model = patched({**LOKI, "mode": "all"})
    x, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(x, **kwargs, **with_cache(DynamicCache(config=model.config)))
    assert loops == [] and out.shape == (2, 28)


def test_sampling_and_scores_still_run_transformers_generate(loops):
    model = patched(LOKI)
    x, mask = batch()
    out = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    assert loops == [] and len(out.scores) == 6


def test_generate_from_a_cache_holding_the_prompt_but_its_last_token(loops):
    """As scripts/bench_loki_generate_full.py times it: the cache filled with all but the last prompt token, then
    generate from it (one-token prefill, the loop), the cache cropped back; the same tokens as Transformers' loop."""
    model = patched(LOKI)
    x, _ = batch()
    outs = []
    for whole_step in (False, True):
        decode_graphs(model).whole_step = whole_step
        cache = LokiCache(model, capacity=64)
        with torch.no_grad():
            model(x[:, :-1], **with_cache(cache))
        for new in (9, 3):
            outs.append(model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, **with_cache(cache)))
            assert cache.get_seq_length() == 24 + new - 1
            cache.crop(-new)
    assert len(loops) == 2 and all(torch.equal(a, b) for a, b in zip(outs[:2], outs[2:]))
    assert torch.equal(outs[1], outs[0][:, :27])


def test_a_cache_that_grows_mid_loop_gets_a_new_graph_and_the_same_tokens(loops):
    """A generation past the cache's capacity (256 tokens here) grows it in place inside the loop."""
    model = patched(DENSE)
    x, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=240, do_sample=False, pad_token_id=0)
    caches = [LokiCache(model), LokiCache(model)]
    want = reference(model, x, **kwargs, **with_cache(caches[0]))
    got = model.generate(x, **kwargs, **with_cache(caches[1]))
    assert len(loops) == 1 and torch.equal(got, want) and caches[1].capacity() == caches[0].capacity() > 256
