"""The budget (k rule, min_tokens, protected sink/recent keys, dense layers) and decode-equivalent evaluation."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from loki_helpers import PLAIN, exact_top_keys, random_basis, tiny_model, with_cache

import hf_patch
from hf_patch import LokiCache, decode_rows, loki_settings, patch_loki, unpatch
from hf_patch.kernels.loki.prefill_naive import protected_keys, selection_mask
from hf_patch.loki.attention import loki_attention_dense, loki_decode_step, visible_keys
from hf_patch.loki.budget import Budget, read_cost
from hf_patch.loki.layer import LokiLayer


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


def test_token_budget_by_number():
    """k_tokens caps every row's k (k_frac the smaller of the two), after the rule and before the protected keys'
    floor, min_tokens and n; dense_up_to is then finite even at k_frac = 1; max_tokens bounds it."""
    n = torch.tensor([1, 2, 5, 8, 9, 100])
    assert Budget(1.0, k_tokens=8).tokens(n).tolist() == [1, 2, 5, 8, 8, 8]  # SparQ's / Quest's fixed budget
    assert Budget(0.25, k_tokens=8).tokens(n).tolist() == [1, 1, 2, 2, 3, 8]  # k_frac where it is smaller
    assert Budget(0.25, "paper", k_tokens=8).tokens(n, torch.tensor(100)).tolist() == [1, 2, 5, 8, 8, 8]
    assert Budget(0.25, "paper", k_tokens=30).tokens(n, torch.tensor(100)).tolist() == [1, 2, 5, 8, 9, 25]
    assert Budget(1.0, k_tokens=5, sink_tokens=2, recent_tokens=3).tokens(n).tolist() == [1, 2, 5, 5, 5, 5]
    assert Budget(1.0, k_tokens=8, min_tokens=20).tokens(torch.tensor([9, 20, 21, 100])).tolist() == [9, 20, 8, 8]
    assert Budget(1.0).dense_up_to == math.inf and Budget(1.0, k_tokens=8).dense_up_to == 8
    assert Budget(1.0, k_tokens=8, min_tokens=20).dense_up_to == 20
    assert Budget(0.9).dense_up_to == 9 and Budget(0.9, k_tokens=8).dense_up_to == 8  # ceil(0.9 * 9) = 9 > 8
    assert Budget(0.5, k_tokens=8, sink_tokens=2, recent_tokens=3).dense_up_to == 5  # the rule binds first
    assert Budget(1.0, k_tokens=8).max_tokens(100) == 8 and Budget(1.0, k_tokens=8).max_tokens(5) == 5
    assert Budget(1.0, k_tokens=8, min_tokens=20).max_tokens(100) == 20
    assert Budget(0.25, "paper", k_tokens=8).describe()["k_tokens"] == 8


def test_read_cost_of_a_token_budget_needs_the_context():
    assert read_cost(0.25, 1.0, k_tokens=256, context=1024) == 0.375  # 256 of 1,024 keys: the paper's (0.25, 0.25)
    assert read_cost(0.25, 0.2, k_tokens=2048, context=4096) == read_cost(0.25, 0.2)  # k_frac the smaller
    assert read_cost(0.25, 1.0, 2, 4, k_tokens=512, context=4096) == pytest.approx((2 + 2 * 0.25) / 4)
    with pytest.raises(ValueError, match="read_cost with k_tokens=256 needs context"):
        read_cost(0.25, 1.0, k_tokens=256)


@pytest.mark.parametrize("kwargs, message", [
    ({"k_tokens": 0}, r"k_tokens must be None or an int >= 1 \(keys kept per row at most\), got 0"),
    ({"k_tokens": True}, "k_tokens must be None or an int >= 1"),
    ({"k_tokens": 2.0}, "k_tokens must be None or an int >= 1"),
    ({"k_tokens": 4, "sink_tokens": 2, "recent_tokens": 3},
     r"k_tokens=4 is below the protected keys \(sink_tokens \+ recent_tokens = 5\), which every row keeps: pass "
     "k_tokens >= 5 or fewer sink/recent tokens"),
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
                                    "d_policy": "uniform", "gqa_select": "query", "ranking": "loki",
                                    "dense_layers": [1]}
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


def exact_top_n(q, k, v, visible, n, scaling):
    """Float64 oracle: each row attends to its n visible keys of largest exact score (all when it sees at most n)."""
    return exact_top_keys(q, k, v, visible, lambda seen: seen.clamp_max(n), scaling)


@pytest.mark.parametrize("n", [1, 6, 11])
def test_token_budget_with_all_dims_is_exact_top_n(n):
    """k_frac = 1, k_tokens = n and d = D (the approximate scores are then the exact ones, in a rotated basis): every
    row, of a teacher-forced pass and of a decode step, attends to the n keys of largest exact score, as an
    exact-top-n oracle selects them (left padding included)."""
    b, hq, hkv, t, d = 2, 4, 2, 24, 16
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for h in (hq, hkv, hkv))
    layer = LokiLayer(random_basis(1, hkv, d, seed=3).components[0], torch.full((hkv,), d), Budget(1.0, k_tokens=n),
                      "all", "query")
    visible = visible_keys(None, t, t, q.device).expand(b, 1, t, t).clone()
    visible[1, ..., :5] = False  # left padding of 5 in the second sequence
    want = exact_top_n(q, k, v, visible, n, d**-0.5)
    got = loki_attention_dense(layer, q, k, v, visible, d**-0.5, False)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 5:].double(), want[1, 5:], atol=1e-5, rtol=1e-5)
    start = torch.tensor([0, 5], dtype=torch.int32)  # the last row as a decode step over the rotated cache
    step = loki_decode_step(layer, q[:, :, -1:], layer.rotate_keys(k), v, start, None, d**-0.5)
    torch.testing.assert_close(step.double(), want[:, -1], atol=1e-5, rtol=1e-5)
    if n < t - 5:  # the cap binds: the oracle is not full attention
        assert (want - exact_top_n(q, k, v, visible, t, d**-0.5)).abs().max() > 1e-2


def test_token_budget_config_loads_and_gives_its_read_cost_at_a_context():
    """configs/loki/smollm2_tokens.yaml loads (k_frac = 1, k_tokens 256 ... 2,048; prefixes whose windows fit
    SmolLM2's 8,192 positions); the main job's table gives a token budget's read cost at the context it names."""
    from pathlib import Path

    from hf_patch.app.experiment import ExperimentConfig, longest_context, table
    from hf_patch.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "loki" / "smollm2_tokens.yaml"
    cfg = ExperimentConfig.from_dict(load_config(path), str(path)).as_dict()
    assert [(s.get("k_frac"), s.get("k_tokens")) for s in cfg["settings"]] == [
        (1.0, 256), (1.0, 512), (1.0, 1024), (1.0, 2048), (None, None)]
    decode = cfg["evaluation"]["decode"]
    assert decode["prefix"] == [4096, 7680] and longest_context(cfg["evaluation"]) == 7680 + 512 == 8192
    rows = [{"setting": "full", "cost": 1.0, "decode": {"ppl": 10.0}},
            {"setting": "k_tokens 512", "cost": round(read_cost(0.25, 1.0, 2, 30, 512, 8192), 4),
             "cost_context": 8192, "decode": {"ppl": 11.0}}]
    assert table(rows).splitlines()[-1] == "| k_tokens 512 | 0.242 at 8192 keys | 11.000 | +10.0% |"
