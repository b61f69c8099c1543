"""`hf-patch calibrate --config configs/loki/calibrate_smollm2.yaml`: calibrate, save, report and plot a basis.

Under `accelerate launch -m hf_patch calibrate ...` each process loads the model on its own device (with
`device: auto`), reads its share of the windows, and the first process writes the basis."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DTYPES, directory, integer, one_of, optional, setting, text
from ..data.store import reusable
from ..data.text import source_identity
from ..parallel import check_device, end_processes, launched, process_split, process_state, resolve_device
from ..loki.basis import CONFIG_NAME, FORMAT_VERSION, PCABasis
from ..loki.calibrate import Calibration, calibrate_pca
from .plots import plot_explained_variance


@dataclass
class CalibrateConfig(Calibration):
    """The `hf-patch calibrate` config: a `Calibration` plus the model to load and the output directory."""

    num_tokens: int = setting(131_072, integer(1))
    model: str | None = setting(None, optional(text))
    dtype: str = setting("float32", one_of(*DTYPES))
    device: str = setting("auto", check_device)
    output: str = setting("outputs/basis", directory)

    def calibration(self) -> Calibration:
        """The calibration settings alone."""
        return Calibration(**{k: v for k, v in self.as_dict().items() if k in Calibration.keys()})


CALIBRATE_FIX = "pass --force to recalibrate over it, or choose another --output"


def basis_fingerprint(model_name: str | None, dtype: str, cal: Calibration) -> dict[str, Any] | None:
    """Everything that determines a calibrated basis: the model (its id, dtype, config and weight files), the
    dataset (`source_identity` and its text column), the token count, window length and rotary variant, and the
    basis format; None when the dataset cannot be identified (an iterator: never reused)."""
    from ..models.smollm2 import model_identity

    dataset = source_identity(cal.dataset)
    if dataset is None:
        return None
    return {"artefact": "loki-basis", "format": FORMAT_VERSION, "model": model_identity(model_name, dtype),
            "dataset": dataset, "text_column": cal.text_column, "num_tokens": cal.num_tokens, "seq_len": cal.seq_len,
            "rotary": cal.rotary}


def stored_basis(output: Path, expected: dict[str, Any] | None, owned: bool, fix: str) -> PCABasis | None:
    """The basis at `output` if it was calibrated from exactly `expected`, else None (nothing there, or hf-patch's
    own basis from other inputs: recalibrate). A basis the user named that was calibrated from other inputs is
    refused (StaleArtefact naming what differed, and `fix`)."""
    if expected is None or not (output / CONFIG_NAME).is_file():
        return None
    try:
        basis = PCABasis.load(output)
    except ValueError as err:
        if not owned:
            raise
        print(f"hf-patch: {output}: {err}; recalibrating it", file=sys.stderr)
        return None
    return basis if reusable(output, basis.metadata.get("fingerprint"), expected, owned, fix, "the basis") else None


def calibrate_to(model, tokenizer, cal: Calibration, output: Path, model_name: str | None = None,
                 force: bool = False, dtype: str = "float32", owned: bool = False,
                 fix: str = "") -> PCABasis:
    """Load the basis at `output` if it was calibrated from the same model, data and settings (its fingerprint),
    else calibrate and save it with its fingerprint (the first process saves it, when launched). A basis from other
    inputs is recalibrated where hf-patch `owned` the place, refused with `fix` otherwise, reused never."""
    expected = basis_fingerprint(model_name, dtype, cal)
    basis = None if force else stored_basis(output, expected, owned, fix or CALIBRATE_FIX)
    if basis is not None:
        print(f"reusing the basis in {output}")
        cal.check_tokens(basis.metadata["tokens"], str(cal.dataset))
        return basis
    basis = calibrate_pca(model, tokenizer, model_id=_model_id(model_name), **cal.as_dict())
    if expected is not None:
        basis.metadata["fingerprint"] = expected
    if process_split()[0] == 0:
        basis.save(output)
        plot_explained_variance({f"{cal.rotary}-RoPE": basis}, output / "explained_variance.png")
    return basis


def _model_id(name: str | None) -> str:
    from ..models.smollm2 import model_id

    return model_id(name)


def describe(basis: PCABasis) -> str:
    """One paragraph: rank@90% per layer (mean over KV heads) and overall."""
    rank = basis.rank_at(0.9).float()
    per_layer = " ".join(f"{r:.0f}" for r in rank.mean(1).tolist())
    return (f"{basis.metadata.get('rotary')}-RoPE basis, {basis.metadata.get('tokens')} tokens: rank@90% = "
            f"{rank.mean():.1f}/{basis.head_dim} (range {int(rank.min())}-{int(rank.max())}); per layer: {per_layer}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML with keys " + ", ".join(sorted(CalibrateConfig.keys())))
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--text-column", help="the dataset's column holding the text (default: text)")
    parser.add_argument("--num-tokens")
    parser.add_argument("--min-tokens", help="fail if the dataset gives fewer tokens than this")
    parser.add_argument("--rotary")
    parser.add_argument("--output")
    parser.add_argument("--device")
    parser.add_argument("--force", action="store_true", help="recalibrate even if the output holds a basis (one "
                        "calibrated from another model, data or settings is refused without it)")


def config_from_args(args: argparse.Namespace) -> CalibrateConfig:
    """The config file (if any) with the flags given on top, checked."""
    flags = dict(model=args.model, dataset=args.dataset, num_tokens=args.num_tokens, min_tokens=args.min_tokens,
                 rotary=args.rotary, output=args.output, device=args.device, text_column=args.text_column)
    if args.config:
        return CalibrateConfig.from_file(args.config, **flags)
    return CalibrateConfig.from_dict({k: v for k, v in flags.items() if v is not None}, "flags")


def run(args: argparse.Namespace) -> int:
    from ..models.smollm2 import load_model

    cfg = config_from_args(args)
    output = Path(cfg.output)
    if not args.force:  # a basis from other inputs in the output is refused before the model loads
        stored_basis(output, basis_fingerprint(cfg.model, cfg.dtype, cfg.calibration()), False, CALIBRATE_FIX)
    device = str(process_state().device) if launched() and cfg.device == "auto" else resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device)
    basis = calibrate_to(model, tokenizer, cfg.calibration(), output, cfg.model, force=args.force, dtype=cfg.dtype)
    if process_split()[0] == 0:
        print(describe(basis))
        print(f"saved to {output} (plot: {output / 'explained_variance.png'})")
    end_processes()  # launched: the first process writes while the others wait
    return 0
