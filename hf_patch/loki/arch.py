"""Which models Loki can patch, and where their attention layers are."""
from __future__ import annotations

import torch
import torch.nn as nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a supported decoder, in layer order.

    Raises a ValueError naming the supported architectures for anything else.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Loki supports the architectures {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(model_type in the config); got {model_type!r} ({type(model).__name__})."
        )
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.base_model.layers")
    modules = [layer.self_attn for layer in layers]
    for i, module in enumerate(modules):
        if getattr(module, "layer_idx", i) != i or not hasattr(module, "num_key_value_groups"):
            raise ValueError(f"layer {i} of {type(model).__name__} does not look like a {model_type} attention layer")
    return modules


def key_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a supported model."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return len(attention_layers(model)), getattr(config, "num_key_value_heads", None) or heads, head_dim


def check_positions(model: nn.Module, length: int, what: str) -> None:
    """Refuse forwards of `length` tokens beyond the positions the model was trained on (its config's
    `max_position_embeddings`, where it has one): what it computes there says little, and a long run is wasted."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise ValueError(f"{what} is {length} tokens, past the model's {limit} positions (max_position_embeddings): "
                         f"use at most {limit}")


def check_weights(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor (one pass over the weights)."""
    for name, weight in model.named_parameters():
        if weight.is_floating_point() and weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"the model's weight {name} holds NaN or infinite values: its checkpoint is damaged or "
                             "was loaded in a dtype too narrow for it; reload or re-convert it")


PREVIOUS_ATTN = "_hf_patch_previous_attn_implementation"  # set on a patched model: the attention it had before


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, PREVIOUS_ATTN)


def loki_layers(model: nn.Module) -> list:
    """The per-layer Loki settings (`LokiLayer`) of a patched model."""
    if not is_patched(model):
        raise ValueError("the model is not patched with Loki: call hf_patch.patch_loki(model, basis) first")
    return [module.hf_patch_loki for module in attention_layers(model)]
