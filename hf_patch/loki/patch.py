"""`patch_loki` / `unpatch`: switch a Llama-family model to Loki attention through Transformers' own interfaces."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import cuda_graph as graphs
from .arch import attention_layers, key_shape
from .attention import ATTENTION_NAME, GQA_SELECT, MODES, LokiLayer, loki_attention_forward
from .basis import PCABasis
from .budget import check_fraction
from .dims import allocate_dims

_PREVIOUS_ATTN = "_hf_patch_previous_attn_implementation"


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, loki_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _PREVIOUS_ATTN)


def loki_layers(model: nn.Module) -> list[LokiLayer]:
    """The per-layer Loki settings of a patched model."""
    if not is_patched(model):
        raise ValueError("the model is not patched with Loki: call hf_patch.patch_loki(model, basis) first")
    return [module.hf_patch_loki for module in attention_layers(model)]


def patch_loki(
    model: nn.Module,
    basis: PCABasis | str | Path,
    d_frac: float = 0.25,
    k_frac: float = 0.25,
    mode: str = "decode",
    d_policy: str = "uniform",
    gqa_select: str = "query",
    cuda_graph: bool = False,
) -> nn.Module:
    """Make `model` attend with Loki (in place; returns the model).

    basis: a `PCABasis` or the directory it was saved to. d_frac: share of the head dim used for approximate
    scores; k_frac: share of the visible tokens each query attends to. mode: "decode" (exact attention at
    prefill, Loki for each generated token) or "all" (Loki on every query row, e.g. perplexity and lm-eval).
    d_policy: "uniform" or "variance" (same average d, spent where key variance needs it). gqa_select: "query"
    (each query head selects its tokens) or "group" (one selection per KV head). cuda_graph: replay each
    one-token step on CUDA (with a `LokiCache`, as `generate` builds) as a CUDA graph, one launch for the whole
    step instead of hundreds (`hf_patch.loki.cuda_graph`). Patching again replaces the settings; `unpatch`
    restores the original attention.
    """
    if not isinstance(basis, PCABasis):
        basis = PCABasis.load(basis)
    modules = attention_layers(model)
    basis.check_compatible(*key_shape(model))
    check_fraction("d_frac", d_frac)
    check_fraction("k_frac", k_frac)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gqa_select not in GQA_SELECT:
        raise ValueError(f"gqa_select must be one of {GQA_SELECT}, got {gqa_select!r}")
    if cuda_graph:
        graphs.check_graphable(model)
    dims = allocate_dims(basis, d_frac, d_policy)

    previous = getattr(model, _PREVIOUS_ATTN, model.config._attn_implementation)
    _register()
    for i, module in enumerate(modules):
        module.hf_patch_loki = LokiLayer(basis.components[i].float(), dims[i], float(k_frac), mode, gqa_select)
    setattr(model, _PREVIOUS_ATTN, previous)
    model.set_attn_implementation(ATTENTION_NAME)
    _install_generation_cache(model)
    graphs.remove(model)  # a graph captured under the previous settings must not replay
    if cuda_graph:
        graphs.install(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch_loki`: the model computes exactly what it did before patching."""
    if not is_patched(model):
        raise ValueError("the model is not patched with Loki")
    for module in attention_layers(model):
        del module.hf_patch_loki
    model.set_attn_implementation(getattr(model, _PREVIOUS_ATTN))
    delattr(model, _PREVIOUS_ATTN)
    model.__dict__.pop("_prepare_cache_for_generation", None)
    graphs.remove(model)
    return model


def _install_generation_cache(model: nn.Module) -> None:
    """Have `generate` build a `LokiCache` where it would build its default `DynamicCache`."""
    from transformers.cache_utils import DynamicCache

    from .cache import LokiCache

    if not hasattr(type(model), "_prepare_cache_for_generation"):  # a model that does not generate (AutoModel)
        return
    original = type(model)._prepare_cache_for_generation.__get__(model)

    def prepare(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs):
        result = original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = LokiCache(model, capacity=max_cache_length)
        return result

    model._prepare_cache_for_generation = prepare
