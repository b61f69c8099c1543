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


class SavedFigures:
    """The matplotlib figures a test saved (`Figure.savefig`), found by the file they were written to."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, object, float]] = []  # (file name as given, Figure, dpi)

    def __call__(self, path):
        """The Figure written to `path` (a temporary name containing the file's name counts too, for atomic writes),
        after asserting that the file on disk decodes as that figure's image: [inches * dpi] pixels, RGBA."""
        from pathlib import Path

        from matplotlib.image import imread

        path = Path(path)
        found = [(fig, dpi) for name, fig, dpi in self.saved
                 if Path(name).parent.resolve() == path.parent.resolve() and path.name in Path(name).name]
        assert found, f"no figure was saved to {path}: saved {[name for name, _, _ in self.saved]}"
        fig, dpi = found[-1]
        width, height = fig.get_size_inches() * dpi
        assert imread(path).shape == (round(height), round(width), 4)
        return fig


@pytest.fixture
def saved_figures(monkeypatch):
    """Records every figure saved during the test (the file is still written): `saved_figures(path)` -> the Figure,
    whose axes hold the plotted data (lines' get_xdata/get_ydata, bars' heights, labels, legend texts)."""
    from matplotlib.figure import Figure

    record = SavedFigures()
    savefig = Figure.savefig

    def recording(fig, fname, *args, **kwargs):
        name = os.fspath(fname) if isinstance(fname, (str, os.PathLike)) else fname.name  # a path or a file object
        record.saved.append((name, fig, kwargs.get("dpi") or fig.dpi))
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return record
