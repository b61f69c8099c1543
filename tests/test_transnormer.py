"""TransNormer causal LM: config mapping, architecture vs a dense reference, cache, generation, save/load, training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import hf_patch  # noqa: F401  (registers the Auto classes)
from hf_patch.transnormer import (
    TransNormerCache,
    TransNormerConfig,
    TransNormerForCausalLM,
    TransNormerModel,
    convert_official_checkpoint,
)
from hf_patch.generation import CACHE_KWARG
from hf_patch.kernels.srmsnorm import _SRMSNormFunction, srms_norm
from hf_patch.transnormer.decay import alibi_slopes, layer_decays
from hf_patch.transnormer.modeling_transnormer import set_norm_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton norm tests: compiled on a GPU, interpreted here

TINY = dict(
    vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
    initializer_range=0.3,  # a random model with spread-out logits: greedy choices are far from ties
)


def tiny_model(seed: int = 0, **overrides) -> TransNormerForCausalLM:
    torch.manual_seed(seed)
    model = TransNormerForCausalLM(TransNormerConfig(**{**TINY, **overrides})).eval()
    model.generation_config.eos_token_id = None  # fixed-length generations, comparable token for token
    model.generation_config.pad_token_id = 0
    return model


# ---------------------------------------------------------------- config and decay


def test_auto_config_standard_and_published_names():
    cfg = AutoConfig.for_model("transnormer", hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert isinstance(cfg, TransNormerConfig) and cfg.attention_hidden_size == 64 and cfg.head_dim == 16
    published = TransNormerConfig(
        decoder_embed_dim=96, decoder_layers=3, decoder_attention_heads=8, hidden_dim=128, glu_dim=-1,
        linear_act_fun="silu", init_std=0.01, no_scale_embedding=True, linear_use_lrpe_list=[1, 0, 0],
        norm_type="simplermsnorm", add_bos_token=False,
    )
    assert (published.hidden_size, published.num_hidden_layers, published.num_attention_heads) == (96, 3, 8)
    assert (published.attention_hidden_size, published.intermediate_size) == (128, 96)
    assert published.initializer_range == 0.01 and published.scale_embedding is False
    assert published.lrpe_layers == [0]
    assert "decoder_embed_dim" not in published.to_dict()
    with pytest.raises(ValueError, match="simplermsnorm"):
        TransNormerConfig(norm_type="layernorm")
    with pytest.raises(ValueError, match="divisible"):
        TransNormerConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="decay_schedule"):
        TransNormerConfig(decay_schedule="alibi")


def test_decay_schedules_follow_the_spec():
    # power of two: s_h = 2^(-8(h+1)/H); 12 heads: the 8 slopes of H=8, then every other one of H=16
    assert alibi_slopes(8) == pytest.approx([2 ** -(h + 1) for h in range(8)])
    assert alibi_slopes(12) == pytest.approx([2 ** -(h + 1) for h in range(8)] + [2 ** -(0.5 + h) for h in range(4)])
    lam = layer_decays("transnormerllm", 4, 8)
    assert lam.shape == (4, 8)
    for layer in range(4):
        expected = [math.exp(-(2 ** -(h + 1)) * (1 - layer / 3 + 1e-5)) for h in range(8)]
        assert lam[layer].tolist() == pytest.approx(expected, rel=1e-12)
    fla = layer_decays("fla", 4, 8)
    assert fla[1].tolist() == pytest.approx([math.exp(-(8 * h / 8) * (1 - 1 / 4)) for h in range(8)], rel=1e-12)
    assert torch.all((lam > 0) & (lam <= 1)) and layer_decays("transnormerllm", 1, 4).shape == (1, 4)


# ---------------------------------------------------------------- architecture vs a dense float64 reference


def reference_logits(model: TransNormerForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """SPEC §3 written out densely in float64: O = [(Q K^T) * M] V with M_ts = lambda^(t-s), no kernels."""
    cfg = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    srms = lambda x: x / x.pow(2).mean(-1, keepdim=True).add(cfg.rms_norm_eps).sqrt()  # noqa: E731
    lam = layer_decays(cfg.decay_schedule, cfg.num_hidden_layers, cfg.num_attention_heads)
    t = torch.arange(ids.shape[1], dtype=torch.float64)
    dist = t[:, None] - t[None, :]
    x = p["model.embed_tokens.weight"][ids] * math.sqrt(cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        q, k, v, u = (srms(x) @ p[pre + "token_mixer.qkvu_proj.weight"].T).chunk(4, -1)
        split = lambda a: a.unflatten(-1, (cfg.num_attention_heads, -1)).transpose(1, 2)  # noqa: E731  [B,H,T,D]
        q, k, v = F.silu(split(q)), F.silu(split(k)), split(v)
        mask = torch.where(dist >= 0, lam[i][:, None, None] ** dist.clamp(min=0), 0.0)  # [H, T, T]
        o = ((q @ k.transpose(-1, -2)) * mask) @ v
        o = srms(o.transpose(1, 2).flatten(2))
        x = x + (u * o) @ p[pre + "token_mixer.out_proj.weight"].T
        h = srms(x)
        gated = (h @ p[pre + "channel_mixer.l1.weight"].T) * (h @ p[pre + "channel_mixer.l2.weight"].T)
        x = x + gated @ p[pre + "channel_mixer.l3.weight"].T
    return srms(x) @ p["model.embed_tokens.weight"].T


@pytest.mark.parametrize("schedule", ["transnormerllm", "fla"])
def test_forward_matches_dense_reference(schedule):
    model = tiny_model(decay_schedule=schedule, initializer_range=0.05)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37))
    with torch.no_grad():
        logits = model(ids).logits
    ref = reference_logits(model, ids)
    assert (logits.double() - ref).norm() / ref.norm() < 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("x_dtype,gate_dtype", [(torch.float32, None), (torch.float32, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_srms_norm_triton_kernels_match_torch(x_dtype, gate_dtype):
    """SRMSNorm (gated: the attention output's norm) in Triton (CPU interpreter off a GPU) vs the PyTorch ops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g).to(x_dtype).to(DEVICE).requires_grad_()
    qkvu = torch.randn(3, 5, 160, generator=g).to(gate_dtype or x_dtype).to(DEVICE)
    gate = qkvu[..., 120:].detach().requires_grad_() if gate_dtype else None  # a strided slice, like u
    dy = torch.randn(3, 5, 40, generator=g).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        y = srms_norm(x, 1e-6, gate=gate, backend=backend)
        results.append((y, *torch.autograd.grad(y, [t for t in (x, gate) if t is not None], dy.to(y.dtype))))
    low = torch.bfloat16 in (x_dtype, gate_dtype)
    for got, want in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _rel(got, want) < (1e-2 if low else 1e-6)


def test_srms_norm_output_dtypes():
    x, u = torch.randn(4, 40).to(DEVICE), torch.randn(4, 40).bfloat16().to(DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        for backend in ("torch", "triton"):
            assert srms_norm(x, 1e-6, autocast_output=True, backend=backend).dtype == torch.bfloat16
            assert srms_norm(x, 1e-6, backend=backend).dtype == torch.float32  # as F.rms_norm under autocast
            assert srms_norm(u, 1e-6, gate=u, autocast_output=True, backend=backend).dtype == torch.bfloat16
    assert srms_norm(x, 1e-6, gate=u).dtype == torch.float32 and srms_norm(u, 1e-6).dtype == torch.bfloat16
    assert srms_norm(x.double(), 1e-6, autocast_output=True).dtype == torch.float64


@pytest.mark.parametrize("autocast", [False, True])
def test_model_on_triton_norms_equals_torch_norms(monkeypatch, autocast):
    """A training step with every SRMSNorm on the Triton kernels: same loss, logits and gradients (bf16 autocast:
    the norms' outputs in bf16 instead of float32 copies that the next linear casts to bf16)."""
    model = tiny_model(lrpe_layers=[1], initializer_range=0.05).train().to(DEVICE)
    ids = torch.randint(0, TINY["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def step():
        model.zero_grad()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    kernel_calls, apply = [], _SRMSNormFunction.apply
    monkeypatch.setattr(_SRMSNormFunction, "apply", lambda *args: kernel_calls.append(1) or apply(*args))
    set_norm_backend(model, "torch")  # "auto" picks Triton for large CUDA inputs
    reference = step()
    assert kernel_calls == []
    set_norm_backend(model, "triton")
    fused = step()
    assert len(kernel_calls) == 3 * TINY["num_hidden_layers"] + 1  # every norm of the forward
    tol = 3e-2 if autocast else 1e-5  # bf16: the interpreter rounds to bf16 by truncation
    assert _rel(fused[0], reference[0]) < tol and _rel(fused[1], reference[1]) < tol
    with pytest.raises(ValueError, match="backend must be one of"):
        set_norm_backend(model, "cuda")


def test_loss_hidden_states_tuple_and_tied_head():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, output_hidden_states=True)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, TINY["vocab_size"]), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    as_tuple = model(ids, labels=labels, return_dict=False)
    assert torch.allclose(as_tuple[0], out.loss) and torch.allclose(as_tuple[1], out.logits)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="padding mask"):
        model(ids, attention_mask=torch.ones(2, 1, 9, 9))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:  # renamed in transformers 5.2x; the old name still works on 5.17
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- cache and generation


def test_cache_state_is_constant_size_and_continues_the_sequence():
    model = tiny_model(lrpe_layers=[0])
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :13], use_cache=True)
        cache = getattr(out, CACHE_KWARG)
        assert isinstance(cache, TransNormerCache) and cache.get_seq_length() == 13
        shapes = [tuple(s.shape) for s in cache.states]
        pieces = [out.logits]
        for t in range(13, 17):  # token by token (the O(1) step)
            pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        pieces.append(model(ids[:, 17:], cache=cache, use_cache=True).logits)  # a chunk from a state
    assert [tuple(s.shape) for s in cache.states] == shapes == [(2, 4, 16, 8)] + [(2, 4, 8, 8)] * 2
    assert all(s.dtype == torch.float32 for s in cache.states) and cache.get_seq_length() == 20
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


@pytest.mark.parametrize("lrpe", [[], [0, 2]])
def test_greedy_generation_with_cache_equals_full_recompute(lrpe):
    model = tiny_model(lrpe_layers=lrpe)
    ids = torch.randint(1, TINY["vocab_size"], (2, 11))
    cached = model.generate(ids, max_new_tokens=24, do_sample=False)
    recomputed = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, 11:].tolist())) > 3  # not a degenerate repetition


def test_beam_search_reorders_the_states():
    model = tiny_model()
    ids = torch.randint(1, TINY["vocab_size"], (2, 6))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3)
    recomputed = model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_left_padded_batch_generation_equals_single_sequences():
    model = tiny_model(lrpe_layers=[1])
    prompts = [torch.randint(1, TINY["vocab_size"], (n,)) for n in (5, 12, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=15, do_sample=False)
        assert torch.equal(batch[row, width:], single[0, len(p) :]), row


def test_padding_does_not_disturb_the_state():
    model = tiny_model()
    real = torch.randint(1, TINY["vocab_size"], (1, 7))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), real], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(real, use_cache=True)
        b = model(padded, attention_mask=mask, use_cache=True)
    for s_a, s_b in zip(getattr(a, CACHE_KWARG).states, getattr(b, CACHE_KWARG).states):
        assert torch.allclose(s_a, s_b, atol=1e-5)
    assert torch.allclose(a.logits, b.logits[:, 4:], atol=1e-5)


def test_forward_takes_the_cache_under_either_name():
    """`cache` (transformers >= 5.25) and `past_key_values` (its name before) are one argument on every release."""
    model = tiny_model()
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        full = model(ids).logits[:, 8:]
        for name in ("cache", "past_key_values"):
            state = getattr(model(ids[:, :8], use_cache=True), CACHE_KWARG)
            out = model(ids[:, 8:], use_cache=True, **{name: state})
            assert getattr(out, CACHE_KWARG) is state and state.get_seq_length() == 9
            assert torch.allclose(out.logits, full, atol=1e-5), name
        with pytest.raises(ValueError, match="pass the cache once"):
            model(ids[:, 8:], cache=state, past_key_values=state)


def test_generate_runs_on_a_transnormer_cache_and_refuses_any_other():
    model = tiny_model()
    ids = torch.randint(1, TINY["vocab_size"], (1, 6))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_KWARG), TransNormerCache)
    assert getattr(out, CACHE_KWARG).get_seq_length() == 6 + 4 - 1
    for name in ("cache", "past_key_values"):  # a cache of one's own, under either name
        mine = TransNormerCache(TINY["num_hidden_layers"])
        again = model.generate(ids, max_new_tokens=4, do_sample=False, **{name: mine})
        assert torch.equal(again, out.sequences) and mine.get_seq_length() == 9
    with pytest.raises(ValueError, match="runs on a TransNormerCache, got a DynamicCache"):
        model.generate(ids, max_new_tokens=4, **{CACHE_KWARG: DynamicCache()})
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, max_new_tokens=4, cache_implementation="static")
    with pytest.raises(ValueError, match="(?i)assist"):  # a recurrent state cannot roll back drafted tokens
        model.generate(ids, max_new_tokens=4, assistant_model=tiny_model(seed=1))


# ---------------------------------------------------------------- save / load and the published checkpoints


def test_save_and_load_through_auto_classes(tmp_path):
    model = tiny_model(lrpe_layers=[2])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "transnormer" and "auto_map" not in saved
    assert (tmp_path / "model.safetensors").is_file()
    ids = torch.randint(0, TINY["vocab_size"], (1, 10))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is TransNormerForCausalLM and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is TransNormerModel
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


PUBLISHED_CONFIG = {
    "architectures": ["TransnormerForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig",
                 "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"},
    "model_type": "transnormer", "vocab_size": 61, "decoder_embed_dim": 32, "decoder_layers": 2,
    "decoder_attention_heads": 4, "hidden_dim": 32, "glu_dim": 48, "linear_act_fun": "silu",
    "norm_type": "simplermsnorm", "linear_use_lrpe_list": [1, 0], "no_scale_embedding": False, "bias": False,
    "init_std": 0.02, "add_bos_token": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published TransnormerForCausalLM names and shapes (from its modeling file)."""
    g = torch.Generator().manual_seed(seed)
    c = PUBLISHED_CONFIG
    d, hid, glu, heads = c["decoder_embed_dim"], c["hidden_dim"], c["glu_dim"], c["decoder_attention_heads"]
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    sd = {"model.embed_tokens.weight": rand(c["vocab_size"], d), "decoder.version": torch.tensor([3.0])}
    for i, lrpe in enumerate(c["linear_use_lrpe_list"]):
        pre = f"model.layers.{i}."
        sd[pre + "token_mixer.qkvu_proj.weight"] = rand(4 * hid, d)
        sd[pre + "token_mixer.out_proj.weight"] = rand(d, hid)
        if lrpe:
            sd[pre + "token_mixer.lrpe.theta"] = rand(heads, 1, d // heads)
        sd[pre + "channel_mixer.l1.weight"] = rand(glu, d)
        sd[pre + "channel_mixer.l2.weight"] = rand(glu, d)
        sd[pre + "channel_mixer.l3.weight"] = rand(d, glu)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def test_convert_official_checkpoint():
    official = official_state_dict()
    config, state_dict = convert_official_checkpoint(dict(PUBLISHED_CONFIG), official)
    assert (config.hidden_size, config.num_hidden_layers, config.lrpe_layers) == (32, 2, [0])
    model = TransNormerForCausalLM(config)
    model.load_state_dict(state_dict, strict=False)
    for key, tensor in official.items():
        if key != "decoder.version":
            assert torch.equal(model.state_dict()[key], tensor), key
    # the bare-model layout (no "model." prefix) converts too
    bare = {k.removeprefix("model."): v for k, v in official.items() if k != "lm_head.weight"}
    assert convert_official_checkpoint(dict(PUBLISHED_CONFIG), bare)[1].keys() == state_dict.keys()
    broken = dict(official)
    broken["model.layers.1.channel_mixer.l3.weight"] = torch.zeros(32, 47)
    with pytest.raises(ValueError, match="l3.weight"):
        convert_official_checkpoint(dict(PUBLISHED_CONFIG), broken)


def test_published_directory_loads_without_remote_code(tmp_path):
    official = official_state_dict(seed=1)
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    save_file({k: v for k, v in official.items() if k != "decoder.version"}, str(tmp_path / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code: our registered class
    assert type(model) is TransNormerForCausalLM
    loaded = model.state_dict()
    for key in ("model.layers.0.token_mixer.lrpe.theta", "model.layers.1.channel_mixer.l2.weight"):
        assert torch.equal(loaded[key], official[key]), key


# ---------------------------------------------------------------- it learns


def test_tiny_model_overfits_a_small_text():
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
            "it was the age of foolishness, it was the epoch of belief. ") * 2
    vocab = sorted(set(text))
    ids = torch.tensor([[vocab.index(ch) for ch in text]])
    torch.manual_seed(0)
    config = TransNormerConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128)
    model = TransNormerForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.5 and losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------- the training script, end to end on CPU


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_setup(tmp_path: Path, **overrides) -> tuple[Path, int]:
    """A word-level tokenizer, uint16 ids of a repeated 50-word phrase and a tiny training config (`overrides` set
    on top) under `tmp_path`: (the config file, the vocab size)."""
    import numpy as np
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<eos>", "<unk>"] + [f"w{i}" for i in range(40)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    phrase = rng.integers(2, len(vocab), 50)
    (tmp_path / "ids").mkdir()
    np.save(tmp_path / "ids" / "train.npy", np.tile(phrase, 80).astype(np.uint16))
    np.save(tmp_path / "ids" / "eval.npy", np.tile(phrase, 8).astype(np.uint16))
    config = {
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
        "tokenizer": str(tmp_path / "tok"), "data": {"tokens_dir": str(tmp_path / "ids")},
        "seq_len": 32, "batch_size": 4, "steps": 12, "lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.0,
        "betas": [0.9, 0.95], "grad_clip": 1.0, "eval_every": 6, "eval_batches": 2, "save_every": 6,
        "mixed_precision": "no", "gradient_checkpointing": False, "output_dir": str(tmp_path / "out"), "seed": 0,
        **overrides,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cfg.yaml", len(vocab)


def test_train_script_runs_both_models(tmp_path, saved_figures):
    config, vocab = train_setup(tmp_path)
    script = _load_script("train_transnormer")
    for kind in ("transnormer", "llama"):
        assert script.main(["--config", str(config), "--model", kind]) == 0
        run = json.loads((tmp_path / "out" / kind / "metrics.json").read_text())
        evals = [r["eval_loss"] for r in run["records"] if "eval_loss" in r]
        assert len(run["records"]) == 12 and len(evals) == 2 and evals[-1] < math.log(vocab) - 0.5
        assert (tmp_path / "out" / kind / "checkpoint-6" / "config.json").is_file()
    tn = json.loads((tmp_path / "out" / "transnormer" / "metrics.json").read_text())["parameters"]
    llama = json.loads((tmp_path / "out" / "llama" / "metrics.json").read_text())["parameters"]
    assert abs(tn - llama) / tn < 0.05  # the baseline has the same size
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "transnormer" / "final")
    assert type(final) is TransNormerForCausalLM
    ax, = saved_figures(tmp_path / "out" / "loss.png").axes  # per model: train loss (thin), eval loss (markers)
    lines = ax.get_lines()
    assert len(lines) == 4 and ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats/token)"
    for kind, train, evals in zip(("transnormer", "llama"), lines[::2], lines[1::2]):
        run = json.loads((tmp_path / "out" / kind / "metrics.json").read_text())
        scored = [r for r in run["records"] if "eval_loss" in r]
        assert list(train.get_xdata()) == [r["step"] for r in run["records"]]
        assert list(train.get_ydata()) == [r["train_loss"] for r in run["records"]]
        assert list(evals.get_xdata()) == [r["step"] for r in scored]
        assert list(evals.get_ydata()) == [r["eval_loss"] for r in scored] and evals.get_marker() == "o"
        assert evals.get_label() == f"{kind} ({run['parameters'] / 1e6:.0f}M) eval {scored[-1]['eval_loss']:.3f}"
        assert train.get_color() == evals.get_color()
