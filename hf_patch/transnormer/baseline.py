"""The Llama baseline of the same size as a TransNormer config (for training curves and the TGS benchmark)."""
from __future__ import annotations

from transformers import LlamaConfig

from .configuration_transnormer import TransNormerConfig


def matching_llama_config(config: TransNormerConfig, max_position_embeddings: int, **overrides) -> LlamaConfig:
    """A Llama (MHA, SwiGLU, RoPE, SDPA) with TransNormer's width, depth, heads, vocab, tying and parameter count.

    Per layer TransNormer has 5*C*A + 3*C*g weights (qkvu, out, GLU; A = attention width, g = GLU width) and Llama
    4*C^2 + 3*C*i, so i = (5A + 3g - 4C) / 3, rounded to a multiple of 8, makes the two the same size.
    """
    width, attn = config.hidden_size, config.attention_hidden_size
    intermediate = round((5 * attn + 3 * config.intermediate_size - 4 * width) / 3 / 8) * 8
    values = dict(
        vocab_size=config.vocab_size,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="sdpa",
    )
    return LlamaConfig(**{**values, **overrides})
