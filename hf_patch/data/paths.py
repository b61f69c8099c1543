"""Where hf-patch keeps what it caches: everything lives under `$HF_PATCH_CACHE` (default `~/.cache/hf_patch`).

    models/SmolLM2-135M-Instruct/   the embedded model as safetensors (`hf-patch convert-model`)
    data/books/                     the book corpus (`hf-patch prepare-data`)
    tasks/<group>/                  the prepared lm-eval task data (`hf-patch prepare-tasks`), standard groups
                                    under tasks/standard/<group>
    downloads/                      pinned wheels and sdists, checked by sha256

Each cached directory carries its fingerprint (`hf_patch.data.store`).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$HF_PATCH_CACHE`, default `~/.cache/hf_patch`: converted models and prepared data live here."""
    return Path(os.environ.get("HF_PATCH_CACHE") or Path.home() / ".cache" / "hf_patch").expanduser()


def books_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the prepared corpus lives: `cache_dir`, default `$HF_PATCH_CACHE/data/books`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data" / "books"


def models_dir() -> Path:
    """`$HF_PATCH_CACHE/models`: converted checkpoints."""
    return cache_root() / "models"


def tasks_dir() -> Path:
    """`$HF_PATCH_CACHE/tasks`: where the prepared task files live."""
    return cache_root() / "tasks"


def downloads_dir() -> Path:
    """`$HF_PATCH_CACHE/downloads`: pinned packages fetched once."""
    return cache_root() / "downloads"
