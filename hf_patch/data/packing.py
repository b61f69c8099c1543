"""Turn a stream of texts into fixed-length token windows (no padding), lazily."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def token_windows(texts: Iterable[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Tokenize `texts` one by one, join them with the EOS token, and yield int64 [seq_len] windows.

    Stops after `max_tokens` tokens (rounded down to whole windows); a final partial window is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    emitted = 0
    for text in texts:
        if len(text) == 0:
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        while len(buffer) >= seq_len:
            if max_tokens is not None and emitted + seq_len > max_tokens:
                return
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            del buffer[:seq_len]
            emitted += seq_len


def batched(windows: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive windows into [batch_size, T] batches (the last one may be smaller)."""
    batch: list[torch.Tensor] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
