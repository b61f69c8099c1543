"""Selection policies (`hf_patch.loki.selection`): the budget's numbers, Loki's ranking as before, exact top-k."""
from __future__ import annotations


import pytest
import torch
from loki_helpers import exact_top_keys, random_basis, tiny_model, with_cache

from hf_patch import LokiCache, decode_rows, patch_loki
from hf_patch.loki.arch import loki_layers
from hf_patch.config import ConfigError
from hf_patch.loki.attention import loki_attention_dense, loki_decode_step, visible_keys
from hf_patch.loki.budget import Budget
from hf_patch.loki.layer import LokiLayer
from hf_patch.loki.selection import ExactRanking, LokiRanking
from hf_patch.loki.settings import LokiSettings

BUDGETS = [Budget(0.25), Budget(0.2, "paper", sink_tokens=4, recent_tokens=6), Budget(0.3, min_tokens=10),
           Budget(1.0, k_tokens=7, sink_tokens=2, recent_tokens=3), Budget(0.5, "paper", k_tokens=5)]


@pytest.mark.parametrize("budget", BUDGETS)
def test_policy_numbers_are_the_budgets(budget):
    policy = LokiRanking(budget)
    n = torch.arange(0, 60)
    window = torch.full_like(n, 59)
    assert torch.equal(policy.keys_per_row(n), budget.tokens(n))
    assert torch.equal(policy.keys_per_row(n, window), budget.tokens(n, window))
    assert [policy.max_keys(s) for s in range(1, 60)] == [budget.max_tokens(s) for s in range(1, 60)]
    assert policy.dense_up_to == budget.dense_up_to
    assert (policy.sink, policy.recent) == (budget.sink_tokens, budget.recent_tokens)
    dims = torch.tensor([3, 5])
    assert LokiRanking(budget).rank_dims(dims, 16) is dims
    assert torch.equal(ExactRanking(budget).rank_dims(dims, 16), torch.tensor([16, 16]))


def test_settings_choose_the_ranking():
    settings = LokiSettings(k_frac=0.3, sink_tokens=1)
    assert settings.ranking == "loki" and settings.policy() == LokiRanking(settings.budget())
    assert settings.replace(ranking="exact").policy() == ExactRanking(settings.budget())
    with pytest.raises(ConfigError, match="ranking must be one of 'loki', 'exact'; got 'oracle'"):
        LokiSettings(ranking="oracle")


def test_a_layer_given_a_budget_holds_lokis_ranking():
    basis = random_basis(1, 2, 16).components[0]
    layer = LokiLayer(basis, torch.tensor([4, 4]), Budget(0.3), "all")
    assert layer.policy == LokiRanking(Budget(0.3)) and layer.budget == Budget(0.3) and layer.kernel_dims == 4
    exact = LokiLayer(basis, torch.tensor([4, 4]), ExactRanking(Budget(0.3)), "all")
    assert exact.kernel_dims == 16 and torch.equal(exact.dims, torch.tensor([16, 16]))


def _ids(b: int = 2, t: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def test_default_policy_is_todays_keyword_patch():
    """`patch_loki` with the default policy computes, bit for bit, what its keyword settings do and what layers
    holding the bare `Budget` (Loki's ranking) do."""
    model, basis, x = tiny_model(), random_basis(), _ids()
    kw = dict(d_frac=0.25, k_frac=0.25, mode="all", sink_tokens=2, recent_tokens=3, dense_layers=0)
    with torch.no_grad():
        patch_loki(model, basis, **kw)
        today = model(x).logits
        patch_loki(model, basis, LokiSettings(**kw, ranking="loki"))
        assert all(type(layer.policy) is LokiRanking for layer in loki_layers(model))
        policy = model(x).logits
        for layer in loki_layers(model):
            layer.policy = layer.budget  # a layer as it was built before policies: its Budget
            layer.__post_init__()
        bare = model(x).logits
    assert torch.equal(policy, today) and torch.equal(bare, today)


@pytest.mark.parametrize("gqa_select", ["query", "group"])
def test_exact_ranking_is_loki_with_every_dim(gqa_select):
    """ranking="exact" keeps what Loki with d_frac = 1 keeps, bit for bit, in both modes (a teacher-forced pass in
    mode "all", on the PyTorch path and through the prefill kernels (per query head), and under `decode_rows`, and prefill + one-token steps in a LokiCache, through the decode kernels),
    whatever d_frac says; and it differs from Loki at d_frac 0.25."""
    basis, x, prompt = random_basis(), _ids(t=36), 20
    kw = dict(k_frac=0.25, gqa_select=gqa_select, sink_tokens=1, recent_tokens=2, dense_layers=0)

    def run(mode: str, **settings) -> torch.Tensor:
        model = tiny_model()
        patch_loki(model, basis, mode=mode, **kw, **settings)
        with torch.no_grad():
            if mode == "all":  # the PyTorch path, then the prefill kernels (Triton's interpreter on the CPU: slow,
                plain = model(x).logits  # so for one of the two selections only)
                if gqa_select == "group":
                    return plain
                for layer in loki_layers(model):
                    layer.prefill_kernels_on_cpu = True
                return torch.stack([plain, model(x).logits])
            with decode_rows(model, prompt):
                teacher = model(x).logits
            cache = LokiCache(model)
            steps = [model(x[:, :prompt], **with_cache(cache), use_cache=True).logits]
            steps += [model(x[:, i:i + 1], **with_cache(cache), use_cache=True).logits for i in range(prompt, x.shape[1])]
            return torch.stack([teacher, torch.cat(steps, 1)])

    for mode in ("all", "decode"):
        exact = run(mode, ranking="exact", d_frac=0.25)
        assert torch.equal(exact, run(mode, d_frac=1.0))
        assert (exact - run(mode, d_frac=0.25)).abs().max() > 1e-3  # the approximation chooses other keys


def exact_top_k(q, k, v, visible, k_frac, scaling):
    """Float64 oracle: each row attends to its ceil(k_frac * n) visible keys (of the n it sees) of largest exact
    score."""
    return exact_top_keys(q, k, v, visible, lambda seen: torch.ceil(seen * k_frac - 1e-9).long(), scaling)


def test_exact_ranking_is_exact_top_k():
    """A layer with `ExactRanking` and a low d attends, on every row of a teacher-forced pass and in a decode step
    (the decode kernels with d = D), to the keys an exact top-k written here selects (left padding included)."""
    b, hq, hkv, t, d, k_frac = 2, 4, 2, 24, 16, 0.3
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for h in (hq, hkv, hkv))
    layer = LokiLayer(random_basis(1, hkv, d, seed=5).components[0], torch.full((hkv,), 2),
                      ExactRanking(Budget(k_frac)), "all", "query")
    visible = visible_keys(None, t, t, q.device).expand(b, 1, t, t).clone()
    visible[1, ..., :5] = False  # left padding of 5 in the second sequence
    want = exact_top_k(q, k, v, visible, k_frac, d**-0.5)
    got = loki_attention_dense(layer, q, k, v, visible, d**-0.5, False)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 5:].double(), want[1, 5:], atol=1e-5, rtol=1e-5)
    start = torch.tensor([0, 5], dtype=torch.int32)  # the last row as a decode step over the rotated cache
    step = loki_decode_step(layer, q[:, :, -1:], layer.rotate_keys(k), v, start, None, d**-0.5)
    torch.testing.assert_close(step.double(), want[:, -1], atol=1e-5, rtol=1e-5)
    full = torch.softmax((q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * d**-0.5
                         + torch.where(visible, 0.0, float("-inf")), -1).nan_to_num(0.0)
    assert (want[0] - (full @ v.double().repeat_interleave(2, 1)).transpose(1, 2)[0]).abs().max() > 1e-2  # sparse


def test_ranking_reaches_the_flags_and_hf_loki_and_leaves_earlier_cache_keys_alone():
    """`ranking` is a `--ranking` flag and an hf-loki model arg like every setting; compare's cache key (hf-loki's
    model args) names it only when it is not the default, so that caches written before it existed stay valid."""
    import argparse
    from pathlib import Path

    from hf_patch.app import compare
    from hf_patch.app.cli import add_schema_flags, schema_flags
    from hf_patch.loki.settings import LmEvalLoki

    parser = argparse.ArgumentParser()
    add_schema_flags(parser, LokiSettings)
    assert LokiSettings(**schema_flags(parser.parse_args(["--ranking", "exact"]), LokiSettings)).ranking == "exact"
    plain = compare.model_args(compare.applied_setting({"mode": "all"}, {"k_frac": 0.25}), Path("b"))
    exact = compare.model_args(compare.applied_setting({"mode": "all"}, {"k_frac": 0.25, "ranking": "exact"}),
                               Path("b"))
    assert "ranking" not in plain and exact == {**plain, "ranking": "exact"}
    assert LmEvalLoki.from_dict(exact).patch_settings().policy() == ExactRanking(Budget(0.25, "paper", 0, 4, 64))
