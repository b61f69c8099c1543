"""Configuration of the TransNormer causal LM (TransNormerLLM architecture on Lightning Attention-2)."""
from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from typing import Any

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from ..config import ConfigError, as_int, flag, positive, shown
from ..generation import CACHE_KWARG

# Published TransNormerLLM config field -> our field (transformers' standard names where one exists).
PUBLISHED_NAMES: dict[str, str] = {
    "decoder_embed_dim": "hidden_size",
    "decoder_layers": "num_hidden_layers",
    "decoder_attention_heads": "num_attention_heads",
    "hidden_dim": "attention_hidden_size",
    "glu_dim": "intermediate_size",
    "linear_act_fun": "hidden_act",
    "init_std": "initializer_range",
}
PUBLISHED_ONLY = (*PUBLISHED_NAMES, "no_scale_embedding", "linear_use_lrpe_list", "norm_type", "add_bos_token")
DECAY_SCHEDULES = ("transnormerllm", "fla")
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_hidden_size",
                 "intermediate_size")
FLAGS = ("scale_embedding", "bias", "use_cache", "tie_word_embeddings")
# keys Transformers itself reads or writes beyond PreTrainedConfig's fields and `to_dict` (taken from kwargs by its
# __post_init__, or added by from_pretrained / save_pretrained)
TRANSFORMERS_KEYS = ("name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation",
                     "experts_implementation", "per_layer_config", "torch_dtype", "num_labels", "rope_scaling",
                     "rope_theta", "rope_parameters", "auto_map", "model_type", "transformers_version",
                     "_attn_implementation_autoset", "_attn_implementation", "_experts_implementation",
                     # the context length, read by tools such as lm-eval's HFLM (a linear-attention model has none)
                     "max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def _from_published(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Rename published TransNormerLLM fields (in place) to ours; they win over our names given alongside."""
    for old, new in PUBLISHED_NAMES.items():
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
    if "no_scale_embedding" in kwargs:
        kwargs["scale_embedding"] = not flag("no_scale_embedding", kwargs.pop("no_scale_embedding"))
    if "linear_use_lrpe_list" in kwargs:
        kwargs["lrpe_layers"] = [i for i, used in enumerate(kwargs.pop("linear_use_lrpe_list")) if used]
    norm_type = kwargs.pop("norm_type", "simplermsnorm")
    if norm_type != "simplermsnorm":
        raise ValueError(f"norm_type={norm_type!r} is not supported; only 'simplermsnorm' (the published default)")
    kwargs.pop("add_bos_token", None)
    return kwargs


class TransNormerConfig(PreTrainedConfig):
    """TransNormer (TransNormerLLM, arXiv 2307.14995) on Lightning Attention-2 (arXiv 2401.04658).

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width C (published `decoder_embed_dim`).
        num_hidden_layers: decoder layers L (published `decoder_layers`).
        num_attention_heads: heads H of the linear attention (published `decoder_attention_heads`).
        attention_hidden_size: width of q, k, v, u (published `hidden_dim`); default `hidden_size`. Head dim = this / H.
        intermediate_size: width of the simple-gated channel mixer `l3(l1(x) * l2(x))` (published `glu_dim`).
        hidden_act: activation of q and k (published `linear_act_fun`), a key of `transformers.activations.ACT2FN`.
        decay_schedule: per-head, per-layer decay lambda. "transnormerllm" (published model): ALiBi slopes
            s_h scaled by (1 - l/(L-1) + 1e-5), lambda = exp(-s). "fla": log lambda = -(8h/H)(1 - l/L).
        lrpe_layers: indices of the layers that use LRPE on q and k (published `linear_use_lrpe_list`).
        scale_embedding: multiply input embeddings by sqrt(hidden_size) (published `no_scale_embedding=False`).
        bias: biases in all linear layers (published `bias`).
        rms_norm_eps: epsilon of the parameter-free SimpleRMSNorm.
        initializer_range: std of the normal init of linear and embedding weights (published `init_std`).

    The published field names are accepted on load and mapped to these, so the public TransNormerLLM `config.json`
    (model_type "transnormer") loads as this class once `hf_patch` is imported.
    """

    model_type = "transnormer"
    keys_to_ignore_at_inference = [CACHE_KWARG]  # the output field Trainer leaves out of predictions

    def __init__(
        self,
        vocab_size: int = 64000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 8,
        attention_hidden_size: int | None = None,
        intermediate_size: int = 2816,
        hidden_act: str = "silu",
        decay_schedule: str = "transnormerllm",
        lrpe_layers: list[int] | None = None,
        scale_embedding: bool = True,
        bias: bool = False,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ):
        fields = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, attention_hidden_size=attention_hidden_size,
            intermediate_size=intermediate_size, hidden_act=hidden_act, decay_schedule=decay_schedule,
            lrpe_layers=lrpe_layers, scale_embedding=scale_embedding, bias=bias, rms_norm_eps=rms_norm_eps,
            initializer_range=initializer_range, use_cache=use_cache, tie_word_embeddings=tie_word_embeddings,
        )
        try:
            fields.update(_from_published({k: kwargs.pop(k) for k in list(kwargs) if k in PUBLISHED_ONLY}))
        except ConfigError as err:
            raise ConfigError(f"TransNormerConfig: {err}") from None
        fields["attention_hidden_size"] = fields["attention_hidden_size"] or fields["hidden_size"]
        if fields["intermediate_size"] == -1:  # published convention: glu_dim=-1 means the embedding width
            fields["intermediate_size"] = fields["hidden_size"]
        _validate(fields)
        _warn_unknown(kwargs)
        for name, value in fields.items():
            setattr(self, name, value)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head width of q, k and v (before LRPE, which doubles q and k)."""
        return self.attention_hidden_size // self.num_attention_heads


def _validate(fields: dict[str, Any]) -> None:
    """Normalise the numbers (in place) and raise a ConfigError that names the field for a bad configuration."""
    try:
        _check_fields(fields)
    except ConfigError as err:
        raise ConfigError(f"TransNormerConfig: {err}") from None


def _check_fields(fields: dict[str, Any]) -> None:
    """The checks of `_validate`, without the class name."""
    for name in POSITIVE_INTS:
        fields[name] = as_int(name, fields[name], 1)
    for name in FLAGS:
        fields[name] = flag(name, fields[name])
    layers = fields["lrpe_layers"] or []
    if not isinstance(layers, (list, tuple)):
        raise ConfigError(f"lrpe_layers must be a list of layer indices, got {shown(layers)}")
    fields["lrpe_layers"] = sorted({as_int(f"lrpe_layers[{i}]", v, 0) for i, v in enumerate(layers)})
    fields["rms_norm_eps"] = positive("rms_norm_eps", fields["rms_norm_eps"])
    fields["initializer_range"] = positive("initializer_range", fields["initializer_range"])
    if fields["hidden_act"] not in ACT2FN:
        raise ConfigError(f"hidden_act must name an activation of transformers.activations.ACT2FN (e.g. 'silu', "
                          f"'gelu', 'relu'); got {shown(fields['hidden_act'])}")
    width, heads, layers = fields["attention_hidden_size"], fields["num_attention_heads"], fields["num_hidden_layers"]
    if width % heads:
        raise ConfigError(f"attention_hidden_size ({width}) must be divisible by num_attention_heads ({heads})")
    if fields["decay_schedule"] not in DECAY_SCHEDULES:
        raise ConfigError(f"decay_schedule must be one of {DECAY_SCHEDULES}, got {shown(fields['decay_schedule'])}")
    if any(not 0 <= i < layers for i in fields["lrpe_layers"]):
        raise ConfigError(f"lrpe_layers {fields['lrpe_layers']} must lie in [0, {layers})")


@functools.cache
def _known_keys() -> frozenset[str]:
    """Keyword arguments TransNormerConfig takes: its own, the published names, and those of Transformers (its
    configs' fields, what `to_dict` writes, generation parameters it drops)."""
    from dataclasses import fields, is_dataclass

    keys = {*inspect.signature(TransNormerConfig.__init__).parameters, *PUBLISHED_ONLY, *TRANSFORMERS_KEYS,
            *PreTrainedConfig().to_dict(), *inspect.signature(PreTrainedConfig.__init__).parameters}
    if is_dataclass(PreTrainedConfig):
        keys |= {f.name for f in fields(PreTrainedConfig)}
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    keys |= set(defaults() if defaults is not None else GenerationConfig().to_dict())
    return frozenset(keys - {"self", "kwargs"})


def _warn_unknown(kwargs: dict[str, Any]) -> None:
    """Warn of each keyword no field reads (Transformers keeps it as a plain attribute, so a typo such as
    `num_hidden_layer=4` would leave the default in force), naming the closest field."""
    own = [name for name in inspect.signature(TransNormerConfig.__init__).parameters if name not in ("self", "kwargs")]
    for key in kwargs:
        if key in _known_keys():
            continue
        close = difflib.get_close_matches(str(key), own, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(own)}"
        warnings.warn(f"TransNormerConfig: unknown key {shown(key)} is kept as an attribute but no field reads it; "
                      f"{hint}", UserWarning, stacklevel=4)
