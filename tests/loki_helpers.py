"""Small random-weight models, bases and a character tokenizer shared by the Loki tests."""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_patch import PCABasis
from hf_patch.generation import CACHE_KWARG

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


# the bare Loki of the paper on every layer (row rule, nothing protected, no dense layer): tiny models see few keys
# and have 2 layers, so patch_loki's defaults (4 sink + 64 recent keys, 2 dense layers) would keep everything
PLAIN = {"k_rule": "row", "sink_tokens": 0, "recent_tokens": 0, "dense_layers": 0}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # fixed-length generations, comparable token for token
    return model


def with_cache(cache) -> dict:
    """`cache` as the keyword argument of forward / generate in the installed transformers (`cache` from 5.25)."""
    return {CACHE_KWARG: cache}


def output_cache(output):
    """The cache field of a model or generate output, under the installed transformers' name."""
    return getattr(output, CACHE_KWARG)


def random_basis(layers: int = 2, heads: int = 2, dim: int = 16, seed: int = 0, rotary: str = "pre") -> PCABasis:
    g = torch.Generator().manual_seed(seed)
    components = torch.linalg.qr(torch.randn(layers, heads, dim, dim, generator=g, dtype=torch.float64))[0].float()
    eigenvalues = torch.rand(layers, heads, dim, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    return PCABasis(components, eigenvalues, torch.zeros(layers, heads, dim), {"rotary": rotary, "model_id": "tiny"})


class CharTokenizer:
    """Enough of a tokenizer for calibration and perplexity: one id per character."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite.",
] * 8


def byte_level_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`; `<|endoftext|>` is its EOS and BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def assert_explained_variance_figure(fig, bases: dict[str, PCABasis], threshold: float = 0.9) -> None:
    """`fig` draws `bases` as `plot_explained_variance` says: left, each basis's rank@threshold per layer (mean over
    KV heads, labelled with the basis's name); right, the first basis's cumulative explained variance per layer."""
    left, right = fig.axes
    assert [line.get_label().split(" (")[0] for line in left.get_lines()] == list(bases)
    for line, basis in zip(left.get_lines(), bases.values()):
        assert list(line.get_xdata()) == list(range(basis.num_layers))
        torch.testing.assert_close(torch.as_tensor(line.get_ydata()), basis.rank_at(threshold).float().mean(1))
    assert [text.get_text().split(" (")[0] for text in left.get_legend().get_texts()] == list(bases)
    assert left.get_xlabel() == "layer" and right.get_xlabel() == "principal components"
    first = next(iter(bases.values()))
    *curves, rule = right.get_lines()
    assert len(curves) == first.num_layers and list(rule.get_ydata()) == [threshold, threshold]
    for curve, expected in zip(curves, first.explained_variance().mean(1)):
        assert list(curve.get_xdata()) == list(range(1, first.head_dim + 1))
        torch.testing.assert_close(torch.as_tensor(curve.get_ydata()), expected)


def reference_loki(model: torch.nn.Module, basis: PCABasis, d_frac: float, k_frac: float, loki_from: int = 0) -> None:
    """Give the (unpatched) `model` a float64 Loki by the paper's definition as its attention: uniform d, the row
    rule, nothing protected, every layer. A query row at sequence index >= `loki_from` keeps the ceil(k_frac * n)
    of its n visible keys with the highest approximate scores (first d dims of query and key rotated by the layer's
    basis), ties to earlier keys; earlier rows attend to every key they see. `model.set_attn_implementation("sdpa")`
    restores it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from hf_patch.loki.dims import allocate_dims
    from hf_patch.loki.layer import visible_keys

    d = int(allocate_dims(basis, d_frac)[0, 0])

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, hq, t, dh = query.shape  # key, value: [B, H_kv, S, D]
        g, s = hq // key.shape[1], key.shape[2]
        p = basis.components[module.layer_idx].double().repeat_interleave(g, 0)  # [H_q, D, D]
        q, k, v = query.double(), key.double().repeat_interleave(g, 1), value.double().repeat_interleave(g, 1)
        approx = (q @ p)[..., :d] @ (k @ p)[..., :d].transpose(-1, -2)  # [B, H_q, T, S]
        visible = visible_keys(attention_mask, t, s, query.device).expand(b, 1, t, s)
        order = torch.sort(approx.masked_fill(~visible, float("-inf")), dim=-1, descending=True, stable=True).indices
        rank = order.argsort(-1)  # [B, H_q, T, S]: each key's place in its row's ranking
        budget = torch.ceil(visible.sum(-1, keepdim=True) * k_frac - 1e-9)
        rows = torch.arange(t, device=query.device)[:, None] + s - t
        keep = visible & ((rank < budget) | (rows < loki_from))
        logits = (q @ k.transpose(-1, -2) * (scaling or dh**-0.5)).masked_fill(~keep, float("-inf"))
        out = torch.softmax(logits, -1).nan_to_num(0.0) @ v
        return out.transpose(1, 2).to(query.dtype).contiguous(), None

    AttentionInterface.register("hf_patch_test_reference_loki", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("hf_patch_test_reference_loki", sdpa_mask)
    model.set_attn_implementation("hf_patch_test_reference_loki")


def exact_top_keys(q, k, v, visible, keys_per_row, scaling):
    """Float64 oracle: each query row attends to the `keys_per_row(n)` visible keys (of the n it sees) of largest
    exact score q . k. q [B, Hq, T, D], k/v [B, Hkv, S, D] (not rotated), visible [B, 1, T, S] -> [B, T, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    logits = (q @ k.transpose(-1, -2)) * scaling
    vis = visible.expand(-1, q.shape[1], -1, -1)
    kept = keys_per_row(vis.sum(-1, keepdim=True))  # [B, Hq, T, 1]
    rank = logits.masked_fill(~vis, float("-inf")).argsort(-1, descending=True).argsort(-1)
    keep = (rank < kept) & vis
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)
