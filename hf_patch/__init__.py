"""hf-patch: cheaper long-context LLMs for Hugging Face Transformers."""
from __future__ import annotations

from .loki.basis import PCABasis
from .loki.cache import LokiCache
from .loki.calibrate import calibrate_pca
from .loki.patch import decode_rows, is_patched, loki_settings, patch_loki, unpatch
from .transnormer import (
    TransNormerConfig,
    TransNormerForCausalLM,
    TransNormerModel,
    disable_graph_decoding,
    enable_graph_decoding,
)

__version__ = "0.1.0"

__all__ = [
    "PCABasis",
    "LokiCache",
    "calibrate_pca",
    "decode_rows",
    "is_patched",
    "loki_settings",
    "patch_loki",
    "unpatch",
    "TransNormerConfig",
    "TransNormerForCausalLM",
    "TransNormerModel",
    "disable_graph_decoding",
    "enable_graph_decoding",
]
