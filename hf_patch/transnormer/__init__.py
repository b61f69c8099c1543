"""TransNormer causal LM on Lightning Attention-2, registered with transformers' Auto classes on import."""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import TransNormerCache
from .configuration_transnormer import TransNormerConfig
from .convert_transnormer import convert_official_checkpoint
from .cuda_graph import disable_graph_decoding, enable_graph_decoding
from .modeling_transnormer import TransNormerForCausalLM, TransNormerModel, TransNormerPreTrainedModel
from .training import CausalLMWithFusedLoss

AutoConfig.register(TransNormerConfig.model_type, TransNormerConfig, exist_ok=True)
AutoModel.register(TransNormerConfig, TransNormerModel, exist_ok=True)
AutoModelForCausalLM.register(TransNormerConfig, TransNormerForCausalLM, exist_ok=True)

__all__ = [
    "CausalLMWithFusedLoss",
    "TransNormerCache",
    "TransNormerConfig",
    "TransNormerForCausalLM",
    "TransNormerModel",
    "TransNormerPreTrainedModel",
    "convert_official_checkpoint",
    "disable_graph_decoding",
    "enable_graph_decoding",
]
