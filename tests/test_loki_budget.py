"""The budget (k rule, min_tokens, protected sink/recent keys, dense layers) and decode-equivalent evaluation."""
from __future__ import annotations

import warnings

import pytest
import torch
from loki_helpers import PLAIN, random_basis, tiny_model, with_cache

import hf_patch
from hf_patch import LokiCache, decode_rows, loki_settings, patch_loki, unpatch
from hf_patch.kernels.loki.prefill_naive import protected_keys, selection_mask
from hf_patch.loki.attention import visible_keys
from hf_patch.loki.budget import Budget, read_cost


def test_budget_rules_by_number():
    n = torch.tensor([1, 2, 5, 8, 100])
    assert Budget(0.25).tokens(n).tolist() == [1, 1, 2, 2, 25]  # ceil, at least 1
    window = torch.tensor(100)
    assert Budget(0.25, "paper").tokens(n, window).tolist() == [1, 2, 5, 8, 25]  # min(n, int(0.25 * 100))
    assert Budget(0.25, "paper").tokens(n).tolist() == [1, 1, 1, 2, 25]  # a decode step ends its window
    assert Budget(0.25, min_tokens=5).tokens(n).tolist() == [1, 2, 5, 2, 25]
    assert Budget(0.25, sink_tokens=2, recent_tokens=3).tokens(n).tolist() == [1, 2, 5, 5, 25]  # >= protected
    assert Budget(0.25, "paper").max_tokens(100) == 25 and Budget(0.3).max_tokens(10) == 3
    assert read_cost(0.25, 0.25) == 0.375 and read_cost(0.5, 0.125) == 0.375
    assert read_cost(0.25, 0.25, dense_layers=2, num_layers=4) == pytest.approx((2 + 2 * 0.375) / 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"k_rule": "rows"}, "k_rule must be one of"),
    ({"sink_tokens": -1}, "sink_tokens must be an int >= 0"),
    ({"recent_tokens": 1.5}, "recent_tokens must be an int >= 0"),
    ({"min_tokens": True}, "min_tokens must be an int >= 0"),
])
def test_budget_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(0.25, **kwargs)


def test_budget_takes_numpy_numbers():
    import numpy as np

    budget = Budget(np.float32(0.25), sink_tokens=np.int64(4))
    assert budget.tokens(torch.tensor([100])).tolist() == [25] and type(budget.sink_tokens) is int
    with pytest.raises(ValueError, match="k_frac must be a fraction"):
        Budget(True)


def test_protected_keys_are_kept_whatever_their_scores():
    b, t, s = 2, 6, 12
    visible = visible_keys(None, t, s, torch.device("cpu")).expand(b, 1, t, s).clone()
    visible[1, ..., :3] = False  # left padding
    scores = torch.arange(s, dtype=torch.float32).flip(0).expand(b, 1, 1, t, s).clone()  # early keys score high
    budget = Budget(0.5, sink_tokens=1, recent_tokens=2)
    budgets = budget.tokens(visible[:, 0].sum(-1))
    # protected keys score lowest
    kept = selection_mask(-scores, visible, budgets, budget.sink_tokens, budget.recent_tokens, group=False)
    protected = protected_keys(visible, 1, 2)
    assert torch.equal(kept.sum(-1)[:, 0, 0], budgets)
    assert (kept[:, 0, 0] >= protected[:, 0]).all()  # every protected key kept
    assert bool(protected[1, 0, -1, 3]) and bool(protected[1, 0, -1, -1]) and not bool(protected[1, 0, -1, 4])


def _ids(b=2, t=40, seed=1):
    return torch.randint(3, 97, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("settings", [
    {}, {"k_rule": "paper"}, {"sink_tokens": 3, "recent_tokens": 5}, {"min_tokens": 8, "dense_layers": [1]},
])
def test_full_budget_still_equals_full_attention(settings):
    model = tiny_model()
    ids = _ids()
    full = model(ids).logits
    patch_loki(model, random_basis(), d_frac=1.0, k_frac=1.0, mode="all", **{**PLAIN, **settings})
    torch.testing.assert_close(model(ids).logits, full, rtol=1e-4, atol=1e-4)
    unpatch(model)
    assert torch.equal(model(ids).logits, full)


def test_paper_rule_keeps_the_first_rows_dense():
    model = tiny_model()
    ids = _ids(t=40)
    full = model(ids).logits
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="all", **{**PLAIN, "k_rule": "paper"})
    out = model(ids).logits
    torch.testing.assert_close(out[:, :10], full[:, :10], rtol=1e-4, atol=1e-4)  # int(0.25 * 40) = 10 rows see <= k
    assert (out[:, 10:] - full[:, 10:]).abs().max() > 1e-3
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="all", **PLAIN)
    assert (model(ids).logits[:, 1:10] - full[:, 1:10]).abs().max() > 1e-3  # the row rule thins them


def test_dense_layers_keep_full_attention_and_are_recorded():
    model = tiny_model()
    ids = _ids()
    full = model(ids).logits
    with pytest.warns(UserWarning, match="covers all 2 layers"):
        patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="all", **{**PLAIN, "dense_layers": 5})
    torch.testing.assert_close(model(ids).logits, full, rtol=1e-4, atol=1e-4)  # both layers dense
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="all", **{**PLAIN, "dense_layers": [1],
                                                                                "sink_tokens": 2})
    assert (model(ids).logits - full).abs().max() > 1e-3
    assert loki_settings(model) == {"d_frac": 0.25, "k_frac": 0.25, "k_rule": "row", "min_tokens": 0,
                                    "sink_tokens": 2, "recent_tokens": 0, "k_tokens": None, "mode": "all",
                                    "d_policy": "uniform", "gqa_select": "query", "dense_layers": [1]}
    with pytest.raises(ValueError, match="dense_layers"):
        patch_loki(model, random_basis(), dense_layers=[2])


def test_decode_mode_warns_when_a_teacher_forced_forward_uses_no_loki():
    model = patch_loki(tiny_model(), random_basis(), d_frac=0.25, k_frac=0.25, mode="decode", **PLAIN)
    with pytest.warns(UserWarning, match="no row of this forward used Loki"):
        model(_ids())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with decode_rows(model, 20):
            model(_ids())
        model.generate(_ids(t=8), max_new_tokens=3, do_sample=False)  # prefill into the Loki cache: no warning


@pytest.mark.parametrize("gqa_select", ["query", "group"])
@pytest.mark.parametrize("settings", [
    {}, {"k_rule": "paper", "sink_tokens": 2, "recent_tokens": 3}, {"min_tokens": 30, "dense_layers": [0]},
])
def test_decode_rows_equal_a_real_decode_loop(gqa_select, settings):
    """One teacher-forced pass under `decode_rows` computes what prefill + one-token steps in a LokiCache do."""
    model = tiny_model()
    ids, prompt = _ids(b=2, t=48), 24
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="decode", gqa_select=gqa_select,
               **{**PLAIN, **settings})
    with decode_rows(model, prompt):
        teacher = model(ids).logits
    cache = LokiCache(model)
    steps = [model(ids[:, :prompt], **with_cache(cache), use_cache=True).logits]
    for i in range(prompt, ids.shape[1]):
        steps.append(model(ids[:, i:i + 1], **with_cache(cache), use_cache=True).logits)
    torch.testing.assert_close(teacher, torch.cat(steps, 1), rtol=1e-4, atol=1e-4)
    unpatch(model)
    assert (teacher[:, prompt:] - model(ids).logits[:, prompt:]).abs().max() > 1e-3  # the steps were sparse


def test_decode_perplexity_matches_one_pass_per_setting():
    from hf_patch.eval.perplexity import decode_perplexity

    model, basis = tiny_model(), random_basis()
    windows = list(_ids(b=2, t=41))
    settings = [("full", None), ("loki", lambda m: patch_loki(m, basis, **{**PLAIN, "sink_tokens": 1, "recent_tokens": 4}))]
    result = decode_perplexity(model, windows, 24, settings, progress=False)
    assert not hf_patch.is_patched(model) and result["full"]["tokens"] == 2 * 16
    for name, patch in settings:
        nll = 0.0
        for w in windows:
            if patch is not None:
                patch(model)
            with decode_rows(model, 24) if patch is not None else torch.no_grad():
                logits = model(w[None, :-1]).logits[0, 24:]
            nll += torch.nn.functional.cross_entropy(logits, w[25:], reduction="sum").item()
            if patch is not None:
                unpatch(model)
        assert result[name]["nll"] == pytest.approx(nll / 32, rel=1e-5)
