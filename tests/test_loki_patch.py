"""Loki patch: exactness at full budget, unpatch, modes, GQA, padding, generation, cache, errors."""
from __future__ import annotations

import pytest
import torch
from loki_helpers import ARCHS, PLAIN, output_cache, random_basis, tiny_model, with_cache

import hf_patch
from hf_patch import LokiCache, patch_loki, unpatch
from hf_patch.loki.cache import APPROX_KEYS
from hf_patch.loki.attention import LokiLayer, loki_attention_dense, visible_keys
from hf_patch.loki.budget import Budget
from hf_patch.loki.dims import allocate_dims


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_budget_equals_full_attention_every_arch(arch):
    model = tiny_model(arch)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        patch_loki(model, random_basis(), d_frac=1.0, k_frac=1.0, mode="all")
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sparse_budget_changes_logits_and_unpatch_restores_exactly(arch):
    model = tiny_model(arch)
    x = tokens(length=40)
    with torch.no_grad():
        ref = model(x).logits
        patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="all", **PLAIN)
        sparse = model(x).logits
        assert hf_patch.is_patched(model)
        unpatch(model)
        back = model(x).logits
    assert (sparse - ref).abs().max() > 1e-3  # Loki really dropped tokens
    assert torch.equal(back, ref)
    assert not hf_patch.is_patched(model)
    assert model.config._attn_implementation == "sdpa"


def test_decode_mode_prefill_is_exact_attention():
    model = tiny_model("llama")
    x = tokens(length=30)
    with torch.no_grad():
        ref = model(x).logits
        patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, mode="decode")
        out = model(x, **with_cache(LokiCache(model))).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def naive_loki(q, k, v, visible, basis_l, dims, k_frac, scaling, gqa_select):
    """Row-by-row float64 reference: q [B, Hq, T, D], k/v [B, Hkv, S, D] (not rotated), visible [B, 1, T, S]."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    q, k, v, p = q.double(), k.double(), v.double(), basis_l.double()
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for bi in range(b):
        for j in range(hkv):
            kr = k[bi, j] @ p[j]
            for row in range(t):
                vis = visible[bi, 0, row].nonzero().flatten()
                if len(vis) == 0:
                    continue
                budget = int(Budget(k_frac).tokens(torch.tensor(len(vis))))
                per_head = [(q[bi, j * g + h, row] @ p[j])[: dims[j]] @ kr[vis, : dims[j]].T for h in range(g)]
                for h in range(g):
                    score = torch.stack(per_head).amax(0) if gqa_select == "group" else per_head[h]
                    chosen = vis[score.topk(budget).indices]
                    w = torch.softmax(scaling * (q[bi, j * g + h, row] @ k[bi, j, chosen].T), -1)
                    out[bi, j * g + h, row] = w @ v[bi, j, chosen]
    return out.transpose(1, 2)


@pytest.mark.parametrize("gqa_select", ["query", "group"])
@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("dims", [[4, 4], [2, 7]])
def test_dense_loki_matches_rowwise_reference(gqa_select, rotated, dims):
    torch.manual_seed(0)
    b, hq, hkv, t, d = 2, 6, 2, 13, 16
    basis = random_basis(1, hkv, d, seed=3)
    loki = LokiLayer(basis.components[0], torch.tensor(dims), Budget(0.3), "all", gqa_select)
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    visible = visible_keys(None, t, t, q.device).expand(b, 1, t, t).clone()
    visible[1, :, :, :3] = False  # left padding of 3 in the second sequence
    k_in = loki.rotate_keys(k) if rotated else k
    out = loki_attention_dense(loki, q, k_in, v, visible, d**-0.5, rotated)
    ref = naive_loki(q, k, v, visible, basis.components[0], dims, 0.3, d**-0.5, gqa_select)
    torch.testing.assert_close(out[1, 3:].double(), ref[1, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0].double(), ref[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_full_budget_equals_original(arch):
    model = tiny_model(arch)
    x = tokens(batch=1, length=12)
    ref = model.generate(x, max_new_tokens=10, do_sample=False)
    patch_loki(model, random_basis(), d_frac=1.0, k_frac=1.0, mode="decode")
    out = model.generate(x, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["decode", "all"])
def test_generate_with_a_token_budget_covering_the_context_equals_original(mode):
    """k_frac = 1 with k_tokens at least the longest context (12 prompt tokens + 10 new: at most 21 keys) keeps every
    key, d_frac 0.25 or not: the patched model generates what the unpatched one does; a smaller cap changes it."""
    model = tiny_model("llama")
    x = tokens(batch=1, length=12)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(x, **kwargs)
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=1.0, k_tokens=21, mode=mode, **PLAIN)
    out = model.generate(x, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.scores, ref.scores):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=1.0, k_tokens=6, mode=mode, **PLAIN)
    capped = model.generate(x, **kwargs)
    assert max(float((a - b).abs().max()) for a, b in zip(capped.scores, ref.scores)) > 1e-3


def test_generate_uses_loki_cache_and_sparse_steps_differ():
    model = tiny_model("llama")
    x = tokens(batch=1, length=64)
    ref = model.generate(x, max_new_tokens=12, do_sample=False)
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.1, mode="decode", **PLAIN)
    result = model.generate(x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(result), LokiCache)
    assert output_cache(result).get_seq_length() == 64 + 12 - 1
    assert not torch.equal(result.sequences, ref)  # 10% of the tokens: generation really changed
    assert torch.equal(result.sequences[:, :64], x)


@pytest.mark.parametrize("gqa_select", ["query", "group"])
def test_padded_batch_generation_equals_each_sequence_alone(gqa_select):
    model = tiny_model("llama", seed=4)
    patch_loki(model, random_basis(seed=5), d_frac=0.5, k_frac=0.5, mode="decode", gqa_select=gqa_select)
    seqs = [tokens(1, 20, seed=7)[0], tokens(1, 13, seed=8)[0]]
    pad = 0
    batch = torch.full((2, 20), pad)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as for generation
        batch[i, 20 - len(s):] = s
        mask[i, 20 - len(s):] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=8, do_sample=False, pad_token_id=pad)
        assert torch.equal(out[i, 20:], alone[0, len(s):]), f"sequence {i} differs when batched"


def test_cache_appends_in_place_and_stores_rotated_keys():
    model = tiny_model("llama")
    basis = random_basis()
    patch_loki(model, basis, mode="decode")
    cache = LokiCache(model, capacity=64)
    x = tokens(batch=1, length=10)
    with torch.no_grad():
        model(x, **with_cache(cache))
        layer = cache.layers[0]
        storage = layer._k.data_ptr()
        for step in range(5):
            model(tokens(1, 1, seed=step), **with_cache(cache))
        assert layer._k.data_ptr() == storage  # no reallocation, no copy per step
        assert cache.get_seq_length() == 15 and layer.keys.shape[2] == 15
        # keys are stored rotated: undoing the rotation gives the model's post-RoPE keys
        plain = tiny_model("llama")
        ref = output_cache(plain(torch.cat([x] + [tokens(1, 1, seed=s) for s in range(5)], 1), use_cache=True))
    p = basis.components[0]
    torch.testing.assert_close(layer.keys @ p.transpose(-1, -2), ref.layers[0].keys, atol=1e-5, rtol=1e-5)
    # beside them, the first d' (= max d rounded up to 8, below D) rotated dims as their own contiguous buffer
    approx = getattr(layer.keys, APPROX_KEYS)
    width = min(layer.keys.shape[-1], -(-int(layer.loki.dims.max()) // 8) * 8)
    assert approx.shape == (*layer.keys.shape[:3], width) and approx.stride(-1) == 1 and width < layer.keys.shape[-1]
    assert torch.equal(approx, layer.keys[..., :width]) and approx.data_ptr() == layer._ka.data_ptr()
    without = LokiCache(model, approx_keys=False)
    with torch.no_grad():
        model(x, **with_cache(without))
    assert not hasattr(without.layers[0].keys, APPROX_KEYS)
    assert torch.equal(without.layers[0].keys, layer.keys[:, :, :10])


def test_cache_grows_geometrically():
    model = tiny_model("llama")
    patch_loki(model, random_basis(), mode="decode")
    cache = LokiCache(model)
    reallocations, last = 0, None
    with torch.no_grad():
        model(tokens(1, 4), **with_cache(cache))
        for step in range(600):
            model(tokens(1, 1, seed=step), **with_cache(cache))
            ptr = cache.layers[0]._k.data_ptr()
            reallocations += ptr != last
            last = ptr
    assert cache.get_seq_length() == 604
    assert reallocations <= 4


def test_variance_policy_spends_same_budget_where_variance_is():
    basis = random_basis(layers=1, heads=2, dim=16)
    basis.eigenvalues[0, 0] = torch.ones(16)  # flat spectrum: needs many dims
    basis.eigenvalues[0, 1] = torch.tensor([100.0] + [1e-3] * 15)  # one dim holds everything
    dims = allocate_dims(basis, 0.25, "variance")
    assert dims.sum() == 2 * 4
    assert dims[0, 0] > dims[0, 1] >= 1
    assert torch.equal(allocate_dims(basis, 0.25, "uniform"), torch.full((1, 2), 4))


def test_variance_policy_end_to_end_matches_rowwise_reference():
    """A model patched with d_policy="variance" equals the same model with `naive_loki` as its attention on the
    dims the policy allocates (several differ from the uniform 4 here), layer by layer."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    model, basis, x = tiny_model("qwen2"), random_basis(), tokens()
    dims = allocate_dims(basis, 0.25, "variance")
    assert dims.sum() == 2 * 2 * 4 and not (dims == 4).all()

    def reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        visible = visible_keys(attention_mask, query.shape[2], key.shape[2], query.device)
        visible = visible.expand(query.shape[0], 1, *visible.shape[2:])
        i = module.layer_idx
        return naive_loki(query, key, value, visible, basis.components[i], dims[i].tolist(), 0.5, scaling,
                          "query").to(query.dtype), None

    AttentionInterface.register("naive_loki_reference", reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register("naive_loki_reference", sdpa_mask)
    with torch.no_grad():
        model.set_attn_implementation("naive_loki_reference")
        ref = model(x).logits
        model.set_attn_implementation("sdpa")
        patch_loki(model, basis, d_frac=0.25, k_frac=0.5, mode="all", d_policy="variance", **PLAIN)
        out = model(x).logits
        patch_loki(model, basis, d_frac=0.25, k_frac=0.5, mode="all", **PLAIN)
        uniform = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (uniform - ref).abs().max() > 1e-3  # the allocated dims are what made them equal


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_frac": 0.0}, "d_frac must be a fraction in"),
        ({"k_frac": 1.5}, "k_frac must be a fraction in"),
        ({"mode": "prefill"}, "mode must be one of"),
        ({"gqa_select": "head"}, "gqa_select must be one of"),
        ({"d_policy": "random"}, "d_policy must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        patch_loki(model, random_basis(), **kwargs)
    assert not hf_patch.is_patched(model)


def test_mismatched_basis_is_refused_with_shapes():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\(2, 2, 8\) but the model has \(2, 2, 16\)"):
        patch_loki(model, random_basis(dim=8))
    with pytest.raises(ValueError, match=r"\(3, 2, 16\) but the model has \(2, 2, 16\)"):
        patch_loki(model, random_basis(layers=3))


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        patch_loki(model, random_basis())


def test_missing_basis_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf-patch calibrate"):
        patch_loki(tiny_model("llama"), tmp_path / "nothing-here")


def test_unpatch_of_unpatched_model_is_an_error():
    with pytest.raises(ValueError, match="not patched"):
        unpatch(tiny_model("llama"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_full_budget_close_to_full_attention(dtype):
    model = tiny_model("llama").to(dtype)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits.float()
        patch_loki(model, random_basis(), d_frac=1.0, k_frac=1.0, mode="all")
        out = model(x).logits.float()
    assert (out - ref).norm() / ref.norm() < 2e-2


@pytest.mark.filterwarnings("ignore:Loki mode 'decode' attends densely")  # the DynamicCache's prefill: dense
@pytest.mark.parametrize("gqa_select", ["query", "group"])
@pytest.mark.parametrize("d_policy, budget", [("uniform", PLAIN), ("variance", PLAIN),
                                              ("uniform", dict(k_rule="paper", sink_tokens=2, recent_tokens=3,
                                                               dense_layers=0))])
def test_decode_kernel_path_equals_dense_path(gqa_select, d_policy, budget):
    """One-token steps over the Loki cache (decode kernel, gathered tokens) equal the dense masked path over a
    plain DynamicCache (keys rotated on the fly), with left padding; with protected sink / recent keys too."""
    from transformers import DynamicCache

    model = tiny_model("llama", seed=2)
    patch_loki(model, random_basis(seed=4), d_frac=0.25, k_frac=0.3, mode="decode", d_policy=d_policy,
               gqa_select=gqa_select, **budget)
    x = tokens(batch=2, length=40, seed=3)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    logits = []
    with torch.no_grad():
        for cache in (LokiCache(model), DynamicCache(config=model.config)):
            model(x, attention_mask=mask, **with_cache(cache))
            m, steps = mask, []
            for step in range(4):
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
                steps.append(model(tokens(2, 1, seed=10 + step), attention_mask=m, **with_cache(cache)).logits)
            logits.append(torch.cat(steps, 1))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
