"""`patch_loki` / `unpatch`: switch a Llama-family model to Loki attention through Transformers' own interfaces."""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import cuda_graph as graphs
from . import generate
from .arch import PREVIOUS_ATTN, attention_layers, is_patched, key_shape, loki_layers
from .attention import ATTENTION_NAME, loki_attention_forward
from .basis import PCABasis
from .dims import allocate_dims
from .layer import LokiLayer
from .settings import LokiSettings

SETTINGS = "hf_patch_loki_settings"  # set on a patched model: the `LokiSettings` it was patched with

def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, loki_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def dense_layer_set(dense_layers: int | Sequence[int], num_layers: int) -> frozenset[int]:
    """Layer indices that keep full attention, from `LokiSettings.dense_layers` (already checked: a count >= 0 or
    distinct indices >= 0): a count from the bottom (all layers if the model has fewer), or a list, each index
    below the model's depth."""
    if not isinstance(dense_layers, (list, tuple)):
        return frozenset(range(min(dense_layers, num_layers)))
    if any(i >= num_layers for i in dense_layers):
        raise ValueError(f"dense_layers must list layer indices in [0, {num_layers}), got {list(dense_layers)!r}")
    return frozenset(dense_layers)


def _check_calibrated_on(basis: PCABasis, model: nn.Module) -> None:
    """Warn when the basis was calibrated on another model than `model` (both ids known): shapes alike, keys not."""
    from ..models.smollm2 import model_id

    calibrated, here = basis.metadata.get("model_id"), getattr(model.config, "_name_or_path", None)
    if calibrated and here and model_id(calibrated) != model_id(here):
        warnings.warn(f"the basis was calibrated on {model_id(calibrated)} but the model is {model_id(here)}: its "
                      "principal directions need not fit this model's keys; calibrate a basis on this model "
                      "(`hf-patch calibrate --model ...`)", UserWarning, stacklevel=3)


def patch_loki(model: nn.Module, basis: PCABasis | str | Path, settings: LokiSettings | None = None,
               **overrides: Any) -> nn.Module:
    """Make `model` attend with Loki (in place; returns the model). `settings`: a `LokiSettings` (default: its
    defaults, the best setting measured at the paper's cost: (0.25, 0.2) by the paper's rule, 4 sink + 64 recent
    keys, 2 dense layers); `overrides`: any of its fields by keyword, set on top (`patch_loki(model, basis,
    k_frac=0.25)`).

    basis: a `PCABasis` or the directory it was saved to. d_frac: share of the head dim used for approximate
    scores; k_frac: share of the keys each query attends to, counted by `k_rule` ("row": of the keys the row
    sees; "paper": of the whole window, as the official Loki evaluation does; see `hf_patch.loki.budget`);
    k_tokens: at most this many keys per row whatever the context (None: no cap), so the budget is the smaller of
    k_frac and k_tokens (`k_frac=1, k_tokens=2048`: a fixed budget of 2,048 keys, as SparQ and Quest spend).
    min_tokens: a row that sees at most this many keys attends to all of them. sink_tokens / recent_tokens: the
    first / last keys a row sees (its own included) are always kept, counted inside k. dense_layers: layers that
    keep full attention, a count from the bottom or a list of indices. mode: "decode" (exact attention at
    prefill, Loki for each generated token) or "all" (Loki on every query row, e.g. perplexity and lm-eval).
    d_policy: "uniform" or "variance" (same average d, spent where key variance needs it). ranking: how the keys
    past the protected ones are chosen (`hf_patch.loki.selection`): "loki" (the approximate scores on the first d
    principal dims) or "exact" (exact top-k on all dims, an oracle: what the approximation loses). gqa_select: "query"
    (each query head selects its tokens) or "group" (one selection per KV head). cuda_graph: replay each
    one-token step on CUDA (with a `LokiCache`, as `generate` builds) as a CUDA graph, one launch for the whole
    step instead of hundreds (`hf_patch.loki.cuda_graph`); greedy `generate` calls then also choose each token
    and check the stop inside the graph, reading the device once every 16 steps, not every token (the same
    tokens; `decode_graphs(model).whole_step = False` turns it off). Patching again replaces the settings; `unpatch`
    restores the original attention.
    """
    if settings is not None and not isinstance(settings, LokiSettings):
        raise TypeError(f"patch_loki's third argument is a LokiSettings, got {type(settings).__name__}: pass the "
                        "settings by keyword (d_frac=..., k_frac=...)")
    if unknown := sorted(set(overrides) - set(LokiSettings.keys())):
        raise TypeError(f"patch_loki got unknown settings {unknown}; the settings are {LokiSettings.keys()}")
    settings = LokiSettings(**overrides) if settings is None else settings.patch_settings().replace(**overrides)
    if not isinstance(basis, (PCABasis, str, os.PathLike)):
        raise TypeError(f"basis must be a PCABasis or the directory a basis was saved to, got "
                        f"{type(basis).__name__}: load one with PCABasis.load(path) or make one with calibrate_pca")
    if not isinstance(basis, PCABasis):
        basis = PCABasis.load(basis)
    modules = attention_layers(model)
    basis.check_compatible(*key_shape(model))
    _check_calibrated_on(basis, model)
    policy = settings.policy()
    dense = dense_layer_set(settings.dense_layers, len(modules))
    if len(dense) == len(modules):
        warnings.warn(f"dense_layers={settings.dense_layers} covers all {len(modules)} layers: every layer keeps "
                      "full attention and Loki changes nothing; pass dense_layers=0 (or fewer) to use it", stacklevel=2)
    if settings.cuda_graph:
        graphs.check_graphable(model)
    dims = allocate_dims(basis, settings.d_frac, settings.d_policy)

    previous = getattr(model, PREVIOUS_ATTN, model.config._attn_implementation)
    _register()
    for i, module in enumerate(modules):
        components = _on_layer_device(basis.components[i].float(), module)
        module.hf_patch_loki = LokiLayer(components, dims[i], policy, settings.mode, settings.gqa_select, i in dense)
    setattr(model, PREVIOUS_ATTN, previous)
    setattr(model, SETTINGS, settings)
    model.set_attn_implementation(ATTENTION_NAME)
    generate.install(model)
    graphs.remove(model)  # a graph captured under the previous settings must not replay
    if settings.cuda_graph:
        graphs.install(model)
    return model


def _on_layer_device(components: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer's basis on the device of its weights, so that a model spread over devices (`device_map`) keeps each
    layer's basis beside the layer. Weights offloaded to the meta device (accelerate loads them where the layer
    runs) leave it where it is: `LokiLayer.basis` moves it to the keys' device on first use."""
    weight = next(module.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return components
    return components.to(weight.device)


def loki_settings(model: nn.Module) -> dict[str, Any]:
    """The settings a patched model was patched with, as plain values for results files: d_frac, the budget
    (`Budget.describe`), mode, d_policy, gqa_select, the ranking and the dense layers' indices."""
    layers = loki_layers(model)  # raises for a model that is not patched
    settings: LokiSettings = getattr(model, SETTINGS)
    return {"d_frac": settings.d_frac, **layers[0].budget.describe(), "mode": settings.mode,
            "d_policy": settings.d_policy, "gqa_select": settings.gqa_select, "ranking": settings.ranking,
            "dense_layers": [i for i, layer in enumerate(layers) if layer.dense]}


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch_loki`: the model computes exactly what it did before patching."""
    if not is_patched(model):
        raise ValueError("the model is not patched with Loki")
    for module in attention_layers(model):
        del module.hf_patch_loki
    model.set_attn_implementation(getattr(model, PREVIOUS_ATTN))
    delattr(model, PREVIOUS_ATTN)
    model.__dict__.pop(SETTINGS, None)
    generate.remove(model)
    graphs.remove(model)
    return model


@contextlib.contextmanager
def decode_rows(model: nn.Module, start: torch.Tensor | Sequence[int] | int) -> Iterator[None]:
    """Inside this block, a teacher-forced forward of a patched model computes what generation would: in
    sequence b, the rows before key index `start[b]` (the prompt) attend densely, as prefill does, and every
    later row attends with Loki over the keys before it, as a decode step would (the paper rule's window is then
    what the row sees). Works in either mode. `start`: an int or one per sequence ([B], left padding included)."""
    layers = loki_layers(model)
    device = next(model.parameters()).device
    start = torch.as_tensor(start, dtype=torch.int64, device=device).reshape(-1)
    try:
        for layer in layers:
            layer.sparse_from = start
        yield
    finally:
        for layer in layers:
            layer.sparse_from = None
