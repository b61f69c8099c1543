"""Map a published TransNormerLLM checkpoint (OpenNLPLab remote code) onto `TransNormerForCausalLM`.

Our module names follow the published ones, so parameter names map one to one; what changes is the config (published
field names -> transformers' standard names) and a few keys the published code saves that we do not use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .configuration_transnormer import TransNormerConfig

# Keys of the published checkpoints that carry no weights of ours (fairseq leftovers).
_IGNORED_KEYS = ("decoder.version", "model.decoder.version")
# Config entries that belong to the remote-code packaging, not to the architecture.
_PACKAGING_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "_name_or_path")


def convert_official_checkpoint(
    config: dict[str, Any] | str | Path, state_dict: dict[str, torch.Tensor]
) -> tuple[TransNormerConfig, dict[str, torch.Tensor]]:
    """Published `config.json` (a dict or its path) and state dict -> our config and a state dict for
    `TransNormerForCausalLM.load_state_dict(..., strict=True)`.

    Accepts state dicts of the published `TransnormerForCausalLM` (keys `model.*`, `lm_head.weight`) and of the bare
    `TransnormerModel` (no `model.` prefix). Raises with the offending keys when names or shapes do not match.
    """
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    if config.get("model_type", "transnormer") != "transnormer":
        raise ValueError(f"not a TransNormerLLM config: model_type={config.get('model_type')!r}")
    ours = TransNormerConfig(**{k: v for k, v in config.items() if k not in _PACKAGING_KEYS})

    converted = {}
    for key, tensor in state_dict.items():
        if key in _IGNORED_KEYS:
            continue
        if not key.startswith(("model.", "lm_head.")):
            key = f"model.{key}"
        converted[key] = tensor
    if ours.tie_word_embeddings or "lm_head.weight" not in converted:
        converted.pop("lm_head.weight", None)
        ours.tie_word_embeddings = True
    _check_against_model(ours, converted)
    return ours, converted


def _check_against_model(config: TransNormerConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Compare names and shapes with a model built on the meta device (no memory used)."""
    from .modeling_transnormer import TransNormerForCausalLM

    with torch.device("meta"):
        expected = {k: v.shape for k, v in TransNormerForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        detail = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k])}" for k in wrong]
        raise ValueError(
            "checkpoint does not match the config: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {detail[:8]}"
        )
