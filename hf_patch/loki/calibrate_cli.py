"""`hf-patch calibrate --config configs/loki/calibrate_smollm2.yaml`: calibrate, save, report and plot a basis."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import load_config, override
from .basis import CONFIG_NAME, PCABasis
from .calibrate import calibrate_pca
from .plots import plot_explained_variance

KEYS = {"model", "dtype", "device", "dataset", "num_tokens", "seq_len", "batch_size", "rotary", "output"}
DEFAULTS: dict[str, Any] = {
    "model": None, "dtype": "float32", "device": "auto", "dataset": "books:calibration", "num_tokens": 131_072,
    "seq_len": 1024, "batch_size": 4, "rotary": "pre", "output": "outputs/basis",
}


def calibrate_to(model, tokenizer, cfg: dict[str, Any], rotary: str, output: Path, force: bool = False) -> PCABasis:
    """Load the basis at `output` if it was calibrated with the same settings, else calibrate and save it."""
    if (output / CONFIG_NAME).is_file() and not force:
        basis = PCABasis.load(output)
        same = basis.metadata.get("rotary") == rotary and basis.metadata.get("tokens", 0) >= cfg["num_tokens"] - cfg["seq_len"]
        if same and basis.metadata.get("dataset") == str(cfg["dataset"]):
            print(f"reusing the basis in {output}")
            return basis
    basis = calibrate_pca(model, tokenizer, cfg["dataset"], num_tokens=cfg["num_tokens"], rotary=rotary,
                          seq_len=cfg["seq_len"], batch_size=cfg["batch_size"], model_id=_model_id(cfg["model"]))
    basis.save(output)
    plot_explained_variance({f"{rotary}-RoPE": basis}, output / "explained_variance.png")
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
    parser.add_argument("--config", help="YAML with keys " + ", ".join(sorted(KEYS)))
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--num-tokens", type=int)
    parser.add_argument("--rotary", choices=("pre", "post"))
    parser.add_argument("--output")
    parser.add_argument("--device")
    parser.add_argument("--force", action="store_true", help="recalibrate even if the output holds a basis")


def run(args: argparse.Namespace) -> int:
    from ..models.smollm2 import load_model
    from .perplexity import resolve_device

    cfg = {**DEFAULTS, **(load_config(args.config, KEYS) if args.config else {})}
    cfg = override(cfg, model=args.model, dataset=args.dataset, num_tokens=args.num_tokens, rotary=args.rotary,
                   output=args.output, device=args.device)
    model, tokenizer = load_model(cfg["model"], dtype=cfg["dtype"], device=resolve_device(cfg["device"]))
    basis = calibrate_to(model, tokenizer, cfg, cfg["rotary"], Path(cfg["output"]), force=args.force)
    print(describe(basis))
    print(f"saved to {cfg['output']} (plot: {Path(cfg['output']) / 'explained_variance.png'})")
    return 0
