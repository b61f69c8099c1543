"""Test setup: Triton kernels run through Triton's CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_model():
    """The embedded SmolLM2-135M-Instruct (float32, CPU), converted to the cache on first use; one load per session.
    Tests must leave it unpatched."""
    from hf_patch.models.smollm2 import load_model

    return load_model()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty `$HF_PATCH_CACHE` (tmp_path/cache) for the test."""
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
