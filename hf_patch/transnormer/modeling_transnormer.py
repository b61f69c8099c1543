"""TransNormer causal LM (TransNormerLLM architecture) on Lightning Attention-2, in transformers' conventions.

Module and parameter names follow the published TransNormerLLM checkpoints (`model.layers.{i}.token_mixer.qkvu_proj`,
`.channel_mixer.l1/l2/l3`, ...), so their state dicts load unchanged (see `convert_transnormer.py`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .. import kernels
from ..generation import CACHE_KWARG, CACHE_NAMES, find_cache, generate_kwargs
from ..kernels.srmsnorm import BACKENDS, srms_norm
from .cache import TransNormerCache
from .configuration_transnormer import TransNormerConfig
from .decay import layer_decays


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class TransNormerSimpleRMSNorm(nn.Module):
    """Parameter-free SRMSNorm `x / (||x||_2 / sqrt(d))` over the last dim, optionally gated: `gate * norm(x)`.

    float32 maths inside (`kernels.srmsnorm.srms_norm`: fused Triton kernels on CUDA, `F.rms_norm` elsewhere).
    With `autocast_output` the result comes in the autocast dtype when autocast is on: for a norm that only feeds
    linear layers, which would cast it to that dtype anyway (the same numbers, without the float32 round trip).
    `backend`: which implementation runs (`srms_norm`'s; `set_norm_backend` sets it for a whole model).
    """

    def __init__(self, eps: float = 1e-6, autocast_output: bool = False, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.autocast_output = autocast_output
        self.backend = backend

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return srms_norm(x, self.eps, gate=gate, autocast_output=self.autocast_output, backend=self.backend)


def set_norm_backend(model: nn.Module, backend: str) -> None:
    """Run every SRMSNorm of `model` on `backend`: "auto" (the default: Triton for large CUDA inputs), "triton"
    (any device Triton runs on, its CPU interpreter included) or "torch" (`F.rms_norm`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, TransNormerSimpleRMSNorm):
            module.backend = backend


class TransNormerLrpe(nn.Module):
    """Linearized relative positional encoding: `[B, T, H, D] -> [B, T, H, 2D]`, `[x cos(theta t), x sin(theta t)]`.

    q_t . k_s then depends on t - s only, so absolute offsets (left padding) do not matter.
    Parameter `theta [H, 1, D]` as published.
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(self.initial_theta(num_heads, head_dim))

    @staticmethod
    def initial_theta(num_heads: int, head_dim: int) -> torch.Tensor:
        d = num_heads * head_dim
        return (10000 ** (-2 / d * torch.arange(d, dtype=torch.float32))).reshape(num_heads, 1, head_dim)

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
        """offset: position of x's first token, an int or int64 [1] on x's device (graphed decode steps)."""
        dtype = _at_least_float32(x.dtype)
        positions = (torch.arange(x.shape[1], device=x.device) + offset).to(dtype)
        angle = positions[:, None, None] * self.theta[:, 0, :].to(dtype)  # [T, H, D]
        xf = x.to(dtype)
        return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)


class TransNormerGLU(nn.Module):
    """Simple-gated channel mixer `l3(l1(x) * l2(x))`, no activation."""

    def __init__(self, config: TransNormerConfig):
        super().__init__()
        self.l1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.l2 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.l3 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l1(x) * self.l2(x))


class TransNormerLinearAttention(nn.Module):
    """Gated linear attention with decay (published `NormLinearAttention`): `[B, T, C] -> [B, T, C]`.

    q, k, v, u = split(qkvu_proj(x)); o_t = act(q_t) KV_t with KV_t = lambda KV_{t-1} + act(k_t)^T v_t per head
    (no softmax, no 1/sqrt(d)); out = out_proj(u * SRMSNorm(o)). Padded positions get v = 0, so they add nothing
    to the state.
    """

    def __init__(self, config: TransNormerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkvu_proj = nn.Linear(config.hidden_size, 4 * config.attention_hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(config.attention_hidden_size, config.hidden_size, bias=config.bias)
        self.norm = TransNormerSimpleRMSNorm(config.rms_norm_eps, autocast_output=True)  # feeds out_proj only
        self.act = ACT2FN[config.hidden_act]
        self.lrpe = TransNormerLrpe(self.num_heads, self.head_dim) if layer_idx in config.lrpe_layers else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        decay: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: TransNormerCache | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, C]; decay [H] float32; padding_mask [B, T] (1 = token, 0 = padding) or None."""
        batch, length, _ = hidden_states.shape
        q, k, v, u = self.qkvu_proj(hidden_states).chunk(4, dim=-1)
        q, k, v = (t.reshape(batch, length, self.num_heads, self.head_dim) for t in (q, k, v))
        q, k = self.act(q), self.act(k)
        if self.lrpe is not None:
            offset = cache.position() if cache is not None else 0
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        if padding_mask is not None:
            v = v * padding_mask[:, :, None, None].to(v.dtype)

        state = cache.get_state(self.layer_idx) if cache is not None else None
        if state is not None and length == 1:
            o, state = kernels.lightning_attn_step(q[:, 0], k[:, 0], v[:, 0], decay, state)
            o = o[:, None]
        else:
            o, state = kernels.lightning_attn(
                q, k, v, decay, initial_state=state, output_final_state=cache is not None
            )
        if cache is not None:
            cache.update_state(self.layer_idx, state)
        return self.out_proj(self.norm(o.reshape(batch, length, -1), gate=u))


class TransNormerDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x += token_mixer(token_norm(x))`, then `x += channel_mixer(channel_norm(x))`."""

    def __init__(self, config: TransNormerConfig, layer_idx: int):
        super().__init__()
        # Both norms feed linear layers only (qkvu_proj; l1 and l2): their output may come in the autocast dtype.
        self.token_norm = TransNormerSimpleRMSNorm(config.rms_norm_eps, autocast_output=True)
        self.token_mixer = TransNormerLinearAttention(config, layer_idx)
        self.channel_norm = TransNormerSimpleRMSNorm(config.rms_norm_eps, autocast_output=True)
        self.channel_mixer = TransNormerGLU(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        decay: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: TransNormerCache | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.token_mixer(
            self.token_norm(hidden_states), decay, padding_mask=padding_mask, cache=cache
        )
        return hidden_states + self.channel_mixer(self.channel_norm(hidden_states))


class TransNormerPreTrainedModel(PreTrainedModel):
    config_class = TransNormerConfig
    config: TransNormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransNormerDecoderLayer"]
    _skip_keys_device_placement = CACHE_NAMES  # the cache, under either name, stays where it is
    _is_stateful = True  # a recurrent state: no rollback, so no assisted generation (read by transformers < 5.25)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TransNormerLrpe):
            heads, _, head_dim = module.theta.shape
            module.theta.copy_(TransNormerLrpe.initial_theta(heads, head_dim))


class TransNormerModel(TransNormerPreTrainedModel):
    """Embeddings, decoder layers and the final norm: `input_ids [B, T] -> last_hidden_state [B, T, C]`."""

    def __init__(self, config: TransNormerConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(TransNormerDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = TransNormerSimpleRMSNorm(config.rms_norm_eps)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.gradient_checkpointing = False
        # Decays per device, made on first use. Not a buffer: they follow from the config, and meta-device loading
        # would leave a non-persistent buffer empty.
        self._decays: dict[torch.device, torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def decays(self, device: torch.device) -> torch.Tensor:
        """Decay lambda of every layer and head, float32 [L, H] on `device` (copied once, not per step)."""
        if device not in self._decays:
            cfg = self.config
            schedule = layer_decays(cfg.decay_schedule, cfg.num_hidden_layers, cfg.num_attention_heads)
            self._decays[device] = schedule.to(device=device, dtype=torch.float32)
        return self._decays[device]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: TransNormerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: TransNormerCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """attention_mask [B, past + T] or [B, T]: 1 = token, 0 = padding (left padding for batched generation).
        cache: the recurrent state to continue from and update (`past_key_values`, its name before transformers
        5.25, is accepted too); the output returns it under the installed release's name (`CACHE_KWARG`).

        `position_ids` and other generation keywords are accepted and ignored: positions only enter through the
        decay (relative) and LRPE (relative), so left padding needs no position shift.
        """
        cache = find_cache({"cache": cache, "past_key_values": past_key_values})
        if output_attentions:
            raise ValueError("TransNormer has no attention matrix to return; call with output_attentions=False")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the cache is written in forward; a checkpointed recompute would write it twice
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if cache is not None and not isinstance(cache, TransNormerCache):
            raise TypeError(
                f"the cache must be a TransNormerCache, got {type(cache).__name__}; pass None and the model creates one"
            )
        if use_cache and cache is None:
            cache = TransNormerCache(self.config.num_hidden_layers)
        if not use_cache:
            cache = None

        padding_mask = _padding_mask(attention_mask, batch, length)
        decays = self.decays(inputs_embeds.device)
        hidden_states = inputs_embeds * self.embed_scale
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer_idx, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, decays[layer_idx], padding_mask=padding_mask, cache=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:  # like Llama: the last entry is after the final norm
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if cache is not None:
            cache.advance(length)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_KWARG: cache}
        )
        return output if return_dict else output.to_tuple()


def _padding_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The last `length` columns of a [B, past + T] 0/1 mask (not tested for all-ones: that would sync the GPU)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(
            f"attention_mask must be a 0/1 padding mask [batch, past + length] = [{batch}, >= {length}], got "
            f"{tuple(attention_mask.shape)}; TransNormer is causal by construction and takes no 4D masks"
        )
    return attention_mask[:, -length:]


class TransNormerForCausalLM(TransNormerPreTrainedModel, GenerationMixin):
    """TransNormer with a language-model head (tied to the input embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransNormerConfig):
        super().__init__(config)
        self.model = TransNormerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate` on a `TransNormerCache` (the recurrent state), passed through its cache argument
        unless the call brings one or caches nothing (use_cache=False); another cache or a `cache_implementation`
        is refused (a recurrent model has no KV cache to build)."""
        kwargs, _ = generate_kwargs(self, args, kwargs, TransNormerCache,
                                    lambda capacity: TransNormerCache(self.config.num_hidden_layers))
        return super().generate(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: TransNormerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: TransNormerCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """labels [B, T] (-100 = ignored) give the mean next-token loss; they are shifted inside, as in Llama.

        The loss goes through the logits, which are returned too (transformers' convention). Training that needs
        only the loss can wrap the model in `hf_patch.transnormer.CausalLMWithFusedLoss` (fused linear + cross
        entropy on the last hidden state: the same loss without [B, T, vocab] logits).

        logits_to_keep: an int keeps the last that many positions' logits (0 = all); a tensor selects positions.
        cache / past_key_values: as in `TransNormerModel.forward`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)})
        return output if return_dict else output.to_tuple()
