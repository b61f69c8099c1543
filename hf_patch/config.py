"""YAML run configurations: load, check keys, apply command-line overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_config(path: str | Path, allowed: set[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping; with `allowed`, unknown top-level keys are an error (typos fail loudly)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    if allowed is not None and (unknown := set(data) - allowed):
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return data


def override(config: dict[str, Any], **values: Any) -> dict[str, Any]:
    """Copy of `config` with the given values set, skipping those that are None (flags not given)."""
    return {**config, **{k: v for k, v in values.items() if v is not None}}
