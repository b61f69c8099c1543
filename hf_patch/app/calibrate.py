"""`hf-patch calibrate --config configs/loki/calibrate_smollm2.yaml`: calibrate, save, report and plot a basis.

Under `accelerate launch -m hf_patch calibrate ...` each process loads the model on its own device (with
`device: auto`), reads its share of the windows, and the first process writes the basis."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..config import DTYPES, directory, integer, one_of, optional, setting, text
from ..parallel import end_processes, launched, process_split, process_state, resolve_device
from ..loki.basis import CONFIG_NAME, PCABasis
from ..loki.calibrate import Calibration, calibrate_pca
from .plots import plot_explained_variance


@dataclass
class CalibrateConfig(Calibration):
    """The `hf-patch calibrate` config: a `Calibration` plus the model to load and the output directory."""

    num_tokens: int = setting(131_072, integer(1))
    model: str | None = setting(None, optional(text))
    dtype: str = setting("float32", one_of(*DTYPES))
    device: str = setting("auto", text)
    output: str = setting("outputs/basis", directory)

    def calibration(self) -> Calibration:
        """The calibration settings alone."""
        return Calibration(**{k: v for k, v in self.as_dict().items() if k in Calibration.keys()})


def reusable(basis: PCABasis, cal: Calibration) -> bool:
    """Whether `basis` is what calibrating with `cal` would give: same rotary and dataset, and as many tokens
    (or every token the dataset had, when an earlier run asked for at least `num_tokens` and it ran out)."""
    meta = basis.metadata
    if meta.get("rotary") != cal.rotary or meta.get("dataset") != str(cal.dataset):
        return False
    tokens = meta.get("tokens", 0)
    return tokens > cal.num_tokens - cal.seq_len or meta.get("num_tokens", 0) >= cal.num_tokens


def calibrate_to(model, tokenizer, cal: Calibration, output: Path, model_name: str | None = None,
                 force: bool = False) -> PCABasis:
    """Load the basis at `output` if it was calibrated with the same settings, else calibrate and save it (the
    first process saves it, when launched)."""
    if (output / CONFIG_NAME).is_file() and not force:
        basis = PCABasis.load(output)
        if reusable(basis, cal):
            print(f"reusing the basis in {output}")
            cal.check_tokens(basis.metadata["tokens"], str(cal.dataset))
            return basis
    basis = calibrate_pca(model, tokenizer, model_id=_model_id(model_name), **cal.as_dict())
    if process_split()[0] == 0:
        basis.save(output)
        plot_explained_variance({f"{cal.rotary}-RoPE": basis}, output / "explained_variance.png")
    return basis


def _model_id(name: str | None) -> str:
    from ..models.smollm2 import DEFAULT_MODEL, HUB_ID

    return HUB_ID if name in (None, DEFAULT_MODEL) else str(name)


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
    parser.add_argument("--num-tokens")
    parser.add_argument("--min-tokens", help="fail if the dataset gives fewer tokens than this")
    parser.add_argument("--rotary")
    parser.add_argument("--output")
    parser.add_argument("--device")
    parser.add_argument("--force", action="store_true", help="recalibrate even if the output holds a basis")


def config_from_args(args: argparse.Namespace) -> CalibrateConfig:
    """The config file (if any) with the flags given on top, checked."""
    flags = dict(model=args.model, dataset=args.dataset, num_tokens=args.num_tokens, min_tokens=args.min_tokens,
                 rotary=args.rotary, output=args.output, device=args.device)
    if args.config:
        return CalibrateConfig.from_file(args.config, **flags)
    return CalibrateConfig.from_dict({k: v for k, v in flags.items() if v is not None}, "flags")


def run(args: argparse.Namespace) -> int:
    from ..models.smollm2 import load_model

    cfg = config_from_args(args)
    output = Path(cfg.output)
    device = str(process_state().device) if launched() and cfg.device == "auto" else resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device)
    basis = calibrate_to(model, tokenizer, cfg.calibration(), output, cfg.model, force=args.force)
    if process_split()[0] == 0:
        print(describe(basis))
        print(f"saved to {output} (plot: {output / 'explained_variance.png'})")
    end_processes()  # launched: the first process writes while the others wait
    return 0
