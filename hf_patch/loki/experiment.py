"""`hf-patch main --config configs/loki/smollm2.yaml`: calibrate -> patch -> perplexity, full vs Loki settings.

Two evaluations, each optional in the config:
- `decode`: what generation computes (`decode_perplexity`): `prefix` tokens prefilled densely, the next
  `new_tokens` scored as decode steps under Loki, in `windows` windows of whole books;
- `all`: Loki on every query row of `seq_len`-token windows (mode "all", what the paper's perplexity measures).

Writes `results.json` (every setting as `patch_loki` applied it), `results.md` (the table) and `perplexity.png`
under the config's `output_dir`, plus one basis directory per rotary variant (reused on later runs).
"""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from ..config import load_config
from .budget import read_cost
from .calibrate_cli import DEFAULTS as CALIBRATION_DEFAULTS
from .calibrate_cli import calibrate_to, describe
from .patch import loki_settings, patch_loki, unpatch
from .perplexity import decode_perplexity, decode_windows, perplexity, resolve_device
from .plots import plot_explained_variance, plot_perplexity

KEYS = {"model", "dtype", "device", "threads", "output_dir", "calibration", "evaluation", "settings"}
# a setting: an optional name and rotary variant, plus any keyword of `patch_loki` (mode and cuda_graph aside)
PATCH_KEYS = set(inspect.signature(patch_loki).parameters) - {"model", "basis", "mode", "cuda_graph"}
SETTING_KEYS = {"name", "rotary"} | PATCH_KEYS
EVALUATIONS = {
    "decode": {"dataset": "books:evaluation:by-book", "prefix": 3072, "new_tokens": 512, "windows": 2,
               "skip_windows": 0},
    "all": {"dataset": "books:evaluation", "seq_len": 2048, "max_tokens": 8192, "batch_size": 1},
}


def check_settings(settings: list[dict[str, Any]]) -> None:
    """Unknown keys in any setting fail before a model is loaded."""
    for s in settings:
        if unknown := set(s) - SETTING_KEYS:
            raise ValueError(f"unknown setting keys {sorted(unknown)}; allowed: {sorted(SETTING_KEYS)}")


def setting_name(s: dict[str, Any]) -> str:
    """The setting's `name`, else a short description of what differs from `patch_loki`'s defaults."""
    if "name" in s:
        return s["name"]
    defaults = {k: p.default for k, p in inspect.signature(patch_loki).parameters.items() if k in PATCH_KEYS}
    parts = [f"d={s.get('d_frac', defaults['d_frac']):g} k={s.get('k_frac', defaults['k_frac']):g}"]
    parts += [f"{k}={v}" for k, v in s.items() if k in PATCH_KEYS - {"d_frac", "k_frac"} and v != defaults[k]]
    if s.get("rotary", "pre") != "pre":
        parts.append(f"{s['rotary']}-RoPE")
    return "loki " + " ".join(parts)


def patch_kwargs(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k in PATCH_KEYS}


def run_experiment(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from ..models.smollm2 import load_model

    out = Path(cfg.get("output_dir", "outputs/main"))
    calib = {**CALIBRATION_DEFAULTS, "model": cfg.get("model"), **cfg.get("calibration", {})}
    evaluations = {name: {**EVALUATIONS[name], **(spec or {})} for name, spec in cfg.get("evaluation", {}).items()}
    if unknown := set(evaluations) - set(EVALUATIONS):
        raise ValueError(f"unknown evaluations {sorted(unknown)}; allowed: {sorted(EVALUATIONS)}")
    settings = cfg.get("settings", [])
    check_settings(settings)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model, tokenizer = load_model(cfg.get("model"), dtype=cfg.get("dtype", "float32"),
                                  device=resolve_device(cfg.get("device", "auto")))
    bases = {}
    for rotary in sorted({s.get("rotary", "pre") for s in settings}):
        bases[rotary] = calibrate_to(model, tokenizer, calib, rotary, out / f"basis-{rotary}")
        print(describe(bases[rotary]))
    if bases:
        plot_explained_variance({f"{r}-RoPE": b for r, b in bases.items()}, out / "explained_variance.png")

    rows = [{"setting": "full", "cost": 1.0}]
    for s in settings:  # record each setting as patch_loki resolves it (defaults included) and what it reads
        patch_loki(model, bases[s.get("rotary", "pre")], mode="all", **patch_kwargs(s))
        applied = loki_settings(model)
        unpatch(model)
        cost = read_cost(applied["d_frac"], applied["k_frac"], len(applied["dense_layers"]), model.config.num_hidden_layers)
        rows.append({"setting": setting_name(s), "cost": round(cost, 4), "rotary": s.get("rotary", "pre"), **applied})

    def patcher(s: dict[str, Any], mode: str):
        return lambda m: patch_loki(m, bases[s.get("rotary", "pre")], mode=mode, **patch_kwargs(s))

    if "decode" in evaluations:
        e = evaluations["decode"]
        windows = decode_windows(tokenizer, e["dataset"], e["prefix"] + e["new_tokens"] + 1, e["windows"],
                                 e["skip_windows"])
        named = [("full", None)] + [(r["setting"], patcher(s, "decode")) for r, s in zip(rows[1:], settings)]
        results = decode_perplexity(model, windows, e["prefix"], named)
        for row in rows:
            row["decode"] = results[row["setting"]]
            print(f"{row['setting']}: decode-equivalent ppl {row['decode']['ppl']:.3f}")
    if "all" in evaluations:
        e = evaluations["all"]
        for row, s in zip(rows, [None] + settings):
            if s is not None:
                patcher(s, "all")(model)
            row["all"] = perplexity(model, tokenizer, e["dataset"], e["seq_len"], e["max_tokens"], e["batch_size"],
                                    desc=row["setting"])
            if s is not None:
                unpatch(model)
            print(f"{row['setting']}: mode-all ppl {row['all']['ppl']:.3f}")
    write_results(rows, {**cfg, "evaluation": evaluations}, out)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    evals = [e for e in EVALUATIONS if e in rows[0]]
    titles = {"decode": "decode-equivalent ppl", "all": "mode-all ppl"}
    lines = ["| setting | read cost | " + " | ".join(f"{titles[e]} | vs full" for e in evals) + " |",
             "|---|---|" + "---|---|" * len(evals)]
    for r in rows:
        cells = [f"{r[e]['ppl']:.3f} | {100 * (r[e]['ppl'] / rows[0][e]['ppl'] - 1):+.1f}%" for e in evals]
        lines.append(f"| {r['setting']} | {r['cost']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": cfg, "results": rows}, indent=2) + "\n")
    what = [f"{e}: {rows[0][e]['tokens']} scored tokens ({json.dumps(cfg['evaluation'][e])})"
            for e in EVALUATIONS if e in rows[0]]
    (out / "results.md").write_text("Perplexity on held-out text; " + "; ".join(what) + "\n\n" + table(rows) + "\n")
    plot_perplexity(rows, out / "perplexity.png")
    print(f"\n{table(rows)}\n\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'perplexity.png'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/loki/smollm2.yaml")
    parser.add_argument("--output-dir")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, KEYS)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    run_experiment(cfg)
    return 0
