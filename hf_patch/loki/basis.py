"""PCA bases of attention keys, one per (layer, KV head): the object Loki calibrates, saves and patches with."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WEIGHTS_NAME = "loki_basis.safetensors"
CONFIG_NAME = "loki_basis.json"
FORMAT_VERSION = 1
TENSOR_NAMES = ("components", "eigenvalues", "mean")
_SAVED_KEYS = ("format_version", "rank_at_90")  # written by `save`, recomputed rather than loaded
_SHAPE_KEYS = ("num_layers", "num_kv_heads", "head_dim")  # written by `save`, checked against the tensors
_RECALIBRATE = "Recalibrate it with `hf-patch calibrate --force` or hf_patch.calibrate_pca(...).save(path)"


@dataclass
class PCABasis:
    """Principal components of the keys of every layer and KV head.

    components: [L, H_kv, D, D]; column j of ``components[l, h]`` is the j-th principal direction (orthonormal,
        sorted by decreasing eigenvalue), so ``K @ components[l, h]`` rotates keys into the basis.
    eigenvalues: [L, H_kv, D], descending (the key variance along each component).
    mean: [L, H_kv, D], the key mean the covariance was centred on (saved, not used at inference: a constant
        shift of every key changes no ranking of a query's scores).
    metadata: model id, rotary ("pre" | "post"), tokens seen, dataset, ... (JSON-serialisable).
    """

    components: torch.Tensor
    eigenvalues: torch.Tensor
    mean: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.components.dim() != 4 or self.components.shape[-1] != self.components.shape[-2]:
            raise ValueError(f"components must be [L, H_kv, D, D], got {tuple(self.components.shape)}")
        if self.eigenvalues.shape != self.components.shape[:-1] or self.mean.shape != self.components.shape[:-1]:
            raise ValueError(
                f"eigenvalues {tuple(self.eigenvalues.shape)} and mean {tuple(self.mean.shape)} must be "
                f"{tuple(self.components.shape[:-1])} to match components {tuple(self.components.shape)}"
            )
        rotary = self.metadata.get("rotary")
        if rotary not in (None, "pre", "post"):
            raise ValueError(f"metadata['rotary'] must be 'pre' or 'post', got {rotary!r}")
        for name in ("components", "eigenvalues", "mean"):
            _check_values(name, getattr(self, name))
        _check_orthonormal(self.components)
        _check_variances(self.eigenvalues)

    @property
    def num_layers(self) -> int:
        return self.components.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.components.shape[1]

    @property
    def head_dim(self) -> int:
        return self.components.shape[-1]

    @property
    def rotary(self) -> str | None:
        return self.metadata.get("rotary")

    def explained_variance(self) -> torch.Tensor:
        """Cumulative fraction of key variance captured by the first j+1 components: [L, H_kv, D]."""
        ev = self.eigenvalues.double().clamp_min(0)
        return (ev.cumsum(-1) / ev.sum(-1, keepdim=True).clamp_min(1e-30)).float()

    def rank_at(self, threshold: float = 0.9) -> torch.Tensor:
        """Fewest components that explain at least `threshold` of the variance: int [L, H_kv]."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        return (self.explained_variance() < threshold - 1e-6).sum(-1) + 1

    def save(self, path: str | Path) -> Path:
        """Write ``path/`` with the tensors (safetensors) and the metadata (JSON), atomically: both are written into
        a directory beside ``path`` that is then renamed into place, so an interruption leaves the old basis or the
        new one, never the new weights with the old JSON. Other files in ``path`` are kept."""
        from safetensors.torch import save_file

        from ..data.store import atomic_directory

        path = Path(path)
        tensors = {
            "components": self.components.float().contiguous(),
            "eigenvalues": self.eigenvalues.double().contiguous(),
            "mean": self.mean.float().contiguous(),
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rank_at_90": self.rank_at(0.9).tolist(),
            **self.metadata,
        }
        with atomic_directory(path, self.metadata.get("fingerprint"), exclusive=False) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "hf_patch.loki"})
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PCABasis":
        """Read a basis written by `save`, checking both files; errors name the file and what was expected."""
        path = Path(path)
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file() or not config.is_file():
            raise FileNotFoundError(
                f"no Loki basis at {path}: expected {WEIGHTS_NAME} and {CONFIG_NAME} there. "
                "Create one with `hf-patch calibrate` or hf_patch.calibrate_pca(...).save(path)."
            )
        meta = _read_metadata(config)
        declared = {key: meta.pop(key) for key in (*_SAVED_KEYS, *_SHAPE_KEYS) if key in meta}
        tensors = _read_tensors(weights)
        try:
            basis = cls(tensors["components"], tensors["eigenvalues"], tensors["mean"], meta)
        except ValueError as err:
            raise ValueError(f"{weights}: {err}. {_RECALIBRATE}") from None
        for key, have in zip(_SHAPE_KEYS, (basis.num_layers, basis.num_kv_heads, basis.head_dim)):
            if declared.get(key, have) != have:
                raise ValueError(f"{config}: {key} = {declared[key]!r} but the tensors in {weights} have {have}: "
                                 f"the two files do not belong together. {_RECALIBRATE}")
        return basis

    def check_compatible(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise a ValueError naming the mismatch when this basis does not fit a model of that shape."""
        want, have = (num_layers, num_kv_heads, head_dim), (self.num_layers, self.num_kv_heads, self.head_dim)
        if want != have:
            raise ValueError(
                f"the PCA basis has (layers, kv_heads, head_dim) = {have} but the model has {want}"
                f" (basis calibrated on {self.metadata.get('model_id', 'an unknown model')}). "
                "Calibrate a basis for this model with hf_patch.calibrate_pca or `hf-patch calibrate`."
            )


def _check_values(name: str, tensor: torch.Tensor) -> None:
    """A floating tensor of finite values."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {kind}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def _check_variances(eigenvalues: torch.Tensor, rtol: float = 1e-6) -> None:
    """Eigenvalues are key variances: none below zero (beyond rounding: -rtol times the head's largest), and not
    all zero in any (layer, KV head), whose explained variance would be undefined."""
    ev = eigenvalues.double()
    top = ev.abs().amax(-1)
    if bool((negative := ev < -rtol * top[..., None]).any()):
        layer, head, j = (int(i) for i in torch.nonzero(negative)[0])
        raise ValueError(f"eigenvalues must be >= 0 (key variances), but layer {layer}, KV head {head} has "
                         f"{float(ev[layer, head, j]):.3g} at component {j}")
    if bool((top == 0).any()):
        layer, head = (int(i) for i in torch.nonzero(top == 0)[0])
        raise ValueError(f"eigenvalues of layer {layer}, KV head {head} are all zero: its keys never varied in "
                         "calibration; calibrate on more (and varied) text")


def _check_orthonormal(components: torch.Tensor, atol: float = 1e-3) -> None:
    """Every components[l, h] must be orthonormal (a rotation of the keys)."""
    c = components.double()
    error = (c.transpose(-1, -2) @ c - torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)).abs().amax((-1, -2))
    if bool((error > atol).any()):
        layer, head = (int(i) for i in torch.nonzero(error > atol)[0])
        raise ValueError(f"components are not orthonormal (max |C^T C - I| = {float(error.max()):.3g}, first at "
                         f"layer {layer}, KV head {head}): each components[l, h] must be an orthonormal matrix")


def _read_metadata(config: Path) -> dict[str, Any]:
    """The JSON object of a saved basis, its format version checked."""
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}): expected the object `PCABasis.save` writes. "
                         f"{_RECALIBRATE}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config} holds a JSON {type(meta).__name__}, expected an object (the metadata "
                         f"`PCABasis.save` writes). {_RECALIBRATE}")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{config}: format_version {version!r} is not {FORMAT_VERSION}, the one this hf-patch "
                         f"reads: use the hf-patch that wrote it, or recalibrate. {_RECALIBRATE}")
    return meta


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved basis, their names checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}). {_RECALIBRATE}") from None
    if missing := [name for name in TENSOR_NAMES if name not in tensors]:
        raise ValueError(f"{weights} lacks the tensors {missing}: expected {list(TENSOR_NAMES)}, found "
                         f"{sorted(tensors)}. {_RECALIBRATE}")
    return tensors
