"""Perplexity on held-out text (teacher-forced, non-overlapping windows), and the `hf-patch perplexity` command."""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, Schema, integer, list_of, optional, setting, text
from ..data.packing import batched, token_windows
from ..generation import CACHE_KWARG
from ..loki.arch import check_positions, check_weights
from ..loki.calibrate import check_dataset


@dataclass
class Evaluation(Schema):
    """The held-out text perplexity is measured on: up to `max_tokens` tokens of `dataset` (None: all of it; its
    column `text_column`, for tables) in `seq_len` windows, `batch_size` windows per forward."""

    dataset: Any = setting("books:evaluation", check_dataset)
    seq_len: int = setting(1024, integer(2))
    max_tokens: int | None = setting(32_768, optional(integer(1)))
    batch_size: int = setting(1, integer(1))
    text_column: str = setting("text", text)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ConfigError(f"max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len}): no window "
                              "would be scored")


def one_or_list(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """Parser for a value or a non-empty list of values that `parse` checks."""
    def parse_one_or_list(name: str, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return parse(name, value)
        if not value:
            raise ConfigError(f"{name} must be a value or a non-empty list, got []")
        return list_of(parse)(name, value)
    return parse_one_or_list


@dataclass
class DecodeEvaluation(Schema):
    """Decode-equivalent perplexity: `windows` windows of `dataset` (after `skip_windows`), each `prefix` tokens
    prefilled densely and the next `new_tokens` scored as generated tokens. `prefix` may list several lengths
    (long-context reading: one measurement per length). `text_column`: the dataset's column holding the text."""

    dataset: Any = setting("books:evaluation:by-book", check_dataset)
    prefix: int | list[int] = setting(3072, one_or_list(integer(1)))
    new_tokens: int = setting(512, integer(1))
    windows: int = setting(2, integer(1))
    skip_windows: int = setting(0, integer(0))
    text_column: str = setting("text", text)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer,
    dataset: Any,
    seq_len: int = 1024,
    max_tokens: int | None = 32_768,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    text_column: str = "text",
) -> dict[str, float]:
    """Mean next-token NLL and perplexity over `seq_len` windows of `dataset` (texts packed with EOS; a table's
    column `text_column`)."""
    from tqdm.auto import tqdm

    from ..loki.calibrate import _texts

    check_positions(model, seq_len, "seq_len")
    check_weights(model)
    texts, _ = _texts(dataset, text_column)
    device = next(model.parameters()).device
    model.eval()
    nll, count, start = 0.0, 0, time.perf_counter()
    with tqdm(total=max_tokens, unit="tok", desc=desc, disable=not progress) as bar:
        for batch in batched(token_windows(texts, tokenizer, seq_len, max_tokens), batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            nll += loss.item()
            count += batch[:, 1:].numel()
            bar.update(batch.numel())
    if count == 0:
        raise ValueError(f"no complete window of seq_len={seq_len} tokens in the evaluation text")
    return {
        "nll": nll / count,
        "ppl": math.exp(nll / count),
        "tokens": count,
        "seconds": round(time.perf_counter() - start, 2),
    }


def decode_windows(tokenizer, dataset: Any, length: int, windows: int, skip_windows: int = 0,
                   text_column: str = "text") -> list[torch.Tensor]:
    """`windows` int64 [length] token windows of `dataset` (a table's column `text_column`), after skipping the
    first `skip_windows`."""
    from ..loki.calibrate import _texts

    texts, _ = _texts(dataset, text_column)
    found = list(itertools.islice(token_windows(texts, tokenizer, length), skip_windows, skip_windows + windows))
    if len(found) < windows:
        raise ValueError(f"the text holds {len(found)} windows of {length} tokens after skipping {skip_windows}, "
                         f"not {windows}: use fewer or shorter windows, or more text")
    return found


@torch.inference_mode()
def decode_perplexity(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    prefix: int,
    settings: Sequence[tuple[str, Callable[[nn.Module], Any] | None]],
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Perplexity of generated-like continuations: in each window [P + N + 1] of token ids, the first P = `prefix`
    tokens are prefilled once with full attention, then for every setting (name, patch) the next N predictions
    are scored as generation computes them: `patch(model)` (None: full attention) and, on a patched model,
    `decode_rows` make each of the N rows attend with Loki over the keys before it (a decode step), in one
    teacher-forced pass over a copy of the prefix cache. The model is unpatched after each setting.
    Returns {name: {"nll", "ppl", "tokens", "seconds"}}."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from ..loki.patch import decode_rows, is_patched, unpatch

    if is_patched(model):
        raise ValueError("decode_perplexity patches the model itself: pass an unpatched model")
    for window in windows:
        if not 0 < prefix < len(window) - 1:
            raise ValueError(f"prefix={prefix} must leave at least one scored token in windows of {len(window)}")
    check_positions(model, max(map(len, windows), default=1) - 1, "prefix + new_tokens")
    check_weights(model)
    device = next(model.parameters()).device
    model.eval()
    sums = {name: [0.0, 0, 0.0] for name, _ in settings}
    for window in tqdm(windows, desc=f"decode perplexity (prefix {prefix})", disable=not progress):
        ids = window.to(device)[None]
        cache = DynamicCache()
        model(input_ids=ids[:, :prefix], **{CACHE_KWARG: cache}, use_cache=True)
        for name, patch in settings:
            start = time.perf_counter()
            if patch is not None:
                patch(model)
            rows = decode_rows(model, prefix) if patch is not None else contextlib.nullcontext()
            with rows:
                logits = model(input_ids=ids[:, prefix:-1], **{CACHE_KWARG: cache}, use_cache=True).logits
            if patch is not None:
                unpatch(model)
            cache.crop(-logits.shape[1])  # drop the scored rows again (a negative count: every release)
            nll = nn.functional.cross_entropy(logits[0].float(), ids[0, prefix + 1:], reduction="sum")
            sums[name][0] += nll.item()
            sums[name][1] += logits.shape[1]
            sums[name][2] += time.perf_counter() - start
    return {name: {"nll": s / n, "ppl": math.exp(s / n), "tokens": n, "seconds": round(t, 2)}
            for name, (s, n, t) in sums.items()}
