"""Training-side wrapper: a causal LM whose forward returns only the loss, through the fused linear + cross entropy.

The models' own ``forward(labels=...)`` keeps transformers' convention (it returns the logits too, so it must make
them). Training and the TGS benchmark do not need logits: ``CausalLMWithFusedLoss(model)`` runs the base model and
``hf_patch.kernels.cross_entropy.causal_lm_loss`` on its last hidden state and the LM head's weight (no
[tokens, vocab] logits, no recompute). It works for the TransNormer and for transformers' Llama alike (anything with
``base_model`` and ``get_output_embeddings()``), so both models of a comparison share the loss code. Being an
``nn.Module`` whose forward is the whole step, it can be handed to ``accelerate`` (which wraps its forward in
autocast and, on several GPUs, in DDP). The loss equals the model's own (mean next-token loss, -100 ignored).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..kernels.cross_entropy import causal_lm_loss


class CausalLMWithFusedLoss(nn.Module):
    """``forward(input_ids, labels, attention_mask=None)`` -> ``CausalLMOutputWithPast(loss=...)`` without logits.

    ``lm`` is the wrapped ``*ForCausalLM`` (save it, not the wrapper). Its LM head must be a plain linear map (no
    logit soft-capping or scaling); ``chunk_size`` is passed to the fused loss.
    """

    def __init__(self, lm: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    # What accelerate's FSDP reads to shard a transformers model, handed on from the wrapped one: its layer classes
    # (one unit each, `TRANSFORMER_BASED_WRAP`), its base model (whose last norm goes with the head) and embeddings
    base_model_prefix = "base_model"

    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.lm, "_no_split_modules", None)

    @property
    def base_model(self) -> nn.Module:
        return self.lm.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        kwargs = {"use_cache": False, **kwargs}
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        loss = causal_lm_loss(hidden, head.weight, labels, head.bias, chunk_size=self.chunk_size)
        return CausalLMOutputWithPast(loss=loss)
