"""Dataset-driven PCA calibration of attention keys, per layer and KV head, streamed in float64."""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, Schema, integer, one_of, setting, shown, text
from ..data.text import check_source
from ..data.packing import batched, token_windows
from ..parallel import process_split, sum_over_processes
from .arch import attention_layers, check_positions, check_weights, is_patched, key_shape
from .basis import PCABasis

ROTARY = ("pre", "post")
_COLLECT_NAME = "hf_patch_collect_keys"


def check_dataset(name: str, value: Any) -> Any:
    """A dataset name or path (its kind checked now: a built-in name, an existing file or directory, or a hub id),
    a `datasets` object or an iterable of strings (checked as it is read)."""
    if value is None or isinstance(value, (bool, int, float)) or not isinstance(value, (Iterable, os.PathLike)):
        raise ConfigError(f"{name} must be a dataset name, a file or directory, or an iterable of strings; "
                          f"got {shown(value)}")
    if isinstance(value, (str, os.PathLike)):
        try:
            check_source(str(value))
        except (ValueError, OSError) as err:
            raise ConfigError(f"{name}: {err}") from None
    return value


@dataclass
class Calibration(Schema):
    """What `calibrate_pca` reads: `num_tokens` tokens of `dataset` (its column `text_column`, for tables) in
    `seq_len` windows, `batch_size` windows per forward. A dataset that runs out first gives a warning, or a
    ConfigError when fewer than `min_tokens` were read."""

    dataset: Any = setting("books:calibration", check_dataset)
    num_tokens: int = setting(262_144, integer(1))
    seq_len: int = setting(1024, integer(2))
    batch_size: int = setting(4, integer(1))
    rotary: str = setting("pre", one_of(*ROTARY))
    min_tokens: int = setting(0, integer(0))
    text_column: str = setting("text", text)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tokens < self.seq_len:
            raise ConfigError(f"num_tokens ({self.num_tokens}) must be at least seq_len ({self.seq_len})")
        if self.min_tokens > self.num_tokens:
            raise ConfigError(f"min_tokens ({self.min_tokens}) must not exceed num_tokens ({self.num_tokens})")

    def check_tokens(self, seen: int, source: str) -> None:
        """Fail below `min_tokens` (or with no whole window), warn below `num_tokens - seq_len`."""
        if seen == 0:
            raise ConfigError(f"the dataset {source} gave fewer than seq_len={self.seq_len} tokens of text: "
                              "give it more text or lower seq_len")
        if seen < self.min_tokens:
            raise ConfigError(f"the dataset {source} gave {seen} tokens, fewer than min_tokens={self.min_tokens}: "
                              "give it more text (or lower min_tokens)")
        if seen <= self.num_tokens - self.seq_len:
            warnings.warn(f"calibration used only {seen} of num_tokens={self.num_tokens} tokens: the dataset "
                          f"{source} ran out; give it more text for a steadier basis (min_tokens makes this an "
                          "error)", stacklevel=3)


class KeyCovariance:
    """Running sums of keys and their outer products, float64, per (layer, KV head)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_layers, num_kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_layers, dtype=torch.int64)

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """keys: [N, H_kv, D] for one layer."""
        k = keys.to(device=self.sum.device, dtype=torch.float64)
        self.sum[layer] += k.sum(0)
        self.outer[layer] += torch.einsum("nhd,nhe->hde", k, k)
        self.count[layer] += k.shape[0]

    def merge_processes(self) -> None:
        """Sum the statistics of every launched process into each of them (one float64 all-reduce; nothing in a
        single process)."""
        flat = sum_over_processes(torch.cat([self.sum.flatten(), self.outer.flatten(), self.count.to(self.sum)]))
        sizes = [self.sum.numel(), self.outer.numel(), self.count.numel()]
        total, outer, count = flat.split(sizes)
        self.sum.copy_(total.view_as(self.sum))
        self.outer.copy_(outer.view_as(self.outer))
        self.count.copy_(count.round().to(torch.int64))

    def basis(self, metadata: dict[str, Any]) -> PCABasis:
        """Eigen-decompose the covariances: components sorted by decreasing variance."""
        if int(self.count.min()) < 2:
            raise ValueError("calibration saw fewer than 2 tokens for some layer: give it more text")
        n = self.count.to(torch.float64).to(self.sum.device)[:, None, None]
        mean = self.sum / n
        cov = self.outer / n[..., None] - mean[..., :, None] * mean[..., None, :]
        eigenvalues, vectors = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
        order = eigenvalues.flip(-1), vectors.flip(-1)
        return PCABasis(order[1].float().cpu(), order[0].cpu(), mean.float().cpu(), metadata)


@contextlib.contextmanager
def _collect_keys(model: nn.Module, rotary: str, sink) -> Iterator[None]:
    """While active, every forward of `model` calls sink(layer, keys [N, H_kv, D])."""
    modules = attention_layers(model)
    _, heads, dim = key_shape(model)
    if rotary == "pre":  # the key projection (after its norm, for Qwen3) before rotary embeddings
        handles = []
        for i, module in enumerate(modules):
            source = getattr(module, "k_norm", None) or module.k_proj
            hook = lambda _m, _inp, out, i=i: sink(i, out.reshape(-1, heads, dim))  # noqa: E731
            handles.append(source.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        return
    # post-RoPE: the keys handed to the attention function
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def collect(module, query, key, value, attention_mask, **kwargs):
        sink(module.layer_idx, key.transpose(1, 2).reshape(-1, heads, dim))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_COLLECT_NAME, collect)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_COLLECT_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def calibrate_pca(
    model: nn.Module,
    tokenizer,
    dataset: Any,
    num_tokens: int = 262_144,
    rotary: str = "pre",
    seq_len: int = 1024,
    batch_size: int = 4,
    progress: bool = True,
    model_id: str | None = None,
    min_tokens: int = 0,
    text_column: str = "text",
) -> PCABasis:
    """Calibrate a Loki basis: stream `dataset` through `model` and PCA its keys per layer and KV head.

    dataset: an iterable of strings, a `datasets` Dataset/IterableDataset with a `text_column` column, a hub name
    ("wikitext:wikitext-2-raw-v1"), local text/json/parquet files, or "books:calibration". Texts are packed
    into `seq_len` windows (EOS between texts) until `num_tokens`; a dataset that runs out first gives a warning
    with the count used, or an error when fewer than `min_tokens` were read. rotary: "pre" collects keys before
    the rotary embedding, "post" after. Sums are kept in float64 on the model's device; nothing else is stored.
    The settings are checked (`Calibration`) before any text is read.

    Under a launcher (`accelerate launch`, `torchrun`; each process calling this with its own replica of the model
    on its own device) the windows are dealt out in turn to the processes and the float64 sums are all-reduced at
    the end: every process returns the basis one process would compute (within float64 rounding).
    """
    cal = Calibration(dataset, num_tokens, seq_len, batch_size, rotary, min_tokens, text_column)
    if is_patched(model):
        raise ValueError("calibrate the original model: call hf_patch.unpatch(model) first")
    check_positions(model, cal.seq_len, "seq_len")
    check_weights(model)
    layers, heads, dim = key_shape(model)
    device = next(model.parameters()).device
    stats = KeyCovariance(layers, heads, dim, device=device)
    texts, source = _texts(cal.dataset, cal.text_column)
    rank, processes = process_split()
    windows = islice(token_windows(texts, tokenizer, cal.seq_len, max_tokens=cal.num_tokens), rank, None, processes)
    seen, start = 0, time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(total=cal.num_tokens, unit="tok", desc=f"calibrate ({cal.rotary}-RoPE)",
              disable=not progress or rank > 0) as bar, _collect_keys(model, cal.rotary, stats.add), \
            torch.inference_mode():
        was_training = model.training
        model.eval()
        for batch in batched(windows, cal.batch_size):
            model.base_model(input_ids=batch.to(device), use_cache=False)
            seen += batch.numel()
            bar.update(batch.numel() * processes)  # the other processes read as many meanwhile
        model.train(was_training)
    stats.merge_processes()
    seen = int(sum_over_processes(torch.tensor([seen], dtype=torch.float64, device=device)).item())
    cal.check_tokens(seen, source)
    metadata = {
        "model_id": model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "model_type": model.config.model_type,
        "rotary": cal.rotary,
        "tokens": seen,
        "num_tokens": cal.num_tokens,
        "seq_len": cal.seq_len,
        "dataset": source,
        "text_column": cal.text_column,
        "seconds": round(time.perf_counter() - start, 2),
        "processes": processes,
    }
    return stats.basis(metadata)


def _texts(dataset: Any, text_column: str = "text") -> tuple[Iterable[str], str]:
    """An iterable of texts and a description of where they come from. Names, paths, `datasets` objects (and
    dicts of them) go through `iter_texts` (their column `text_column`); any other iterable must yield strings."""
    from ..data.text import iter_texts

    if isinstance(dataset, (str, os.PathLike, Mapping)) or hasattr(dataset, "column_names"):
        name = dataset if isinstance(dataset, (str, os.PathLike)) else type(dataset).__name__
        return iter_texts(dataset, text_column=text_column), str(name)
    if isinstance(dataset, Iterable):
        size = f"{len(dataset)} " if hasattr(dataset, "__len__") else ""
        return _strings(dataset), f"{size}texts ({type(dataset).__name__})"
    return iter_texts(dataset, text_column=text_column), type(dataset).__name__  # iter_texts says what it accepts


def _strings(texts: Iterable[Any]) -> Iterator[str]:
    """The items of `texts`, which must be strings."""
    for i, item in enumerate(texts):
        if not isinstance(item, str):
            raise TypeError(f"dataset item {i} is a {type(item).__name__}, expected str: pass an iterable of "
                            "strings, a `datasets` dataset with a text column, or a dataset name or path")
        yield item
