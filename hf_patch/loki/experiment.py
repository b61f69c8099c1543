"""`hf-patch main --config configs/loki/smollm2.yaml`: calibrate -> patch -> perplexity, full vs Loki settings.

Writes `results.json`, `results.md` (the table) and `perplexity.png` under the config's `output_dir`, plus one
basis directory per rotary variant (reused on later runs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import load_config
from .calibrate_cli import DEFAULTS as CALIBRATION_DEFAULTS
from .calibrate_cli import calibrate_to, describe
from .patch import patch_loki, unpatch
from .perplexity import perplexity, resolve_device
from .plots import plot_explained_variance, plot_perplexity

KEYS = {"model", "dtype", "device", "output_dir", "calibration", "evaluation", "settings"}
SETTING_KEYS = {"rotary", "d_frac", "k_frac", "d_policy", "gqa_select"}
EVAL_DEFAULTS = {"dataset": "books:evaluation", "seq_len": 1024, "max_tokens": 32_768, "batch_size": 1}


def setting_name(s: dict[str, Any]) -> str:
    name = f"loki d={s['d_frac']:g} k={s['k_frac']:g} {s.get('rotary', 'pre')}"
    if s.get("d_policy", "uniform") != "uniform":
        name += f" {s['d_policy']}-d"
    if s.get("gqa_select", "query") != "query":
        name += f" {s['gqa_select']}-sel"
    return name


def run_experiment(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    from ..models.smollm2 import load_model

    out = Path(cfg.get("output_dir", "outputs/main"))
    calib = {**CALIBRATION_DEFAULTS, "model": cfg.get("model"), **cfg.get("calibration", {})}
    evaluation = {**EVAL_DEFAULTS, **cfg.get("evaluation", {})}
    settings = cfg.get("settings", [])
    for s in settings:
        if unknown := set(s) - SETTING_KEYS:
            raise ValueError(f"unknown setting keys {sorted(unknown)}; allowed: {sorted(SETTING_KEYS)}")
    model, tokenizer = load_model(cfg.get("model"), dtype=cfg.get("dtype", "float32"),
                                  device=resolve_device(cfg.get("device", "auto")))
    bases = {}
    for rotary in sorted({s.get("rotary", "pre") for s in settings}):
        bases[rotary] = calibrate_to(model, tokenizer, calib, rotary, out / f"basis-{rotary}")
        print(describe(bases[rotary]))
    if bases:
        plot_explained_variance({f"{r}-RoPE": b for r, b in bases.items()}, out / "explained_variance.png")

    def measure(name: str) -> dict[str, Any]:
        result = perplexity(model, tokenizer, evaluation["dataset"], evaluation["seq_len"], evaluation["max_tokens"],
                            evaluation["batch_size"], desc=name)
        print(f"{name}: ppl {result['ppl']:.3f}")
        return {"setting": name, **result}

    rows = [measure("full")]
    for s in settings:
        patch_loki(model, bases[s.get("rotary", "pre")], s["d_frac"], s["k_frac"], mode="all",
                   d_policy=s.get("d_policy", "uniform"), gqa_select=s.get("gqa_select", "query"))
        rows.append({**measure(setting_name(s)), **s})
        unpatch(model)
    write_results(rows, cfg, out)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    full = rows[0]["ppl"]
    lines = ["| setting | perplexity | vs full |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {100 * (r['ppl'] / full - 1):+.1f}% |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": cfg, "results": rows}, indent=2) + "\n")
    tokens = rows[0]["tokens"]
    (out / "results.md").write_text(f"Perplexity on {tokens} held-out tokens\n\n{table(rows)}\n")
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
