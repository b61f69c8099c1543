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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (DTYPES, ConfigError, Schema, directory, given, integer, list_of, load_config, one_of, optional,
                      override, setting, shown, text)
from ..data.store import write_json, write_text
from ..loki.arch import check_positions, check_weights
from ..loki.budget import read_cost
from ..loki.calibrate import Calibration
from ..loki.patch import loki_settings, patch_loki, unpatch
from ..eval.perplexity import DecodeEvaluation, Evaluation, decode_perplexity, decode_windows, perplexity
from ..loki.settings import LokiSettings, SweepSetting
from ..parallel import check_device, resolve_device
from .calibrate import calibrate_to, describe
from .plots import plot_explained_variance, plot_perplexity


@dataclass
class Evaluations(Schema):
    """Which evaluations `hf-patch main` runs (each a mapping of the keys that differ from its defaults)."""

    decode: dict[str, Any] | None = setting(None, optional(given(DecodeEvaluation)))
    all: dict[str, Any] | None = setting(None, optional(given(Evaluation)))


@dataclass
class ExperimentConfig(Schema):
    """The `hf-patch main` config; `calibration` holds the keys of `Calibration` that differ from its defaults,
    `evaluation` those of `Evaluations`, `settings` one `SweepSetting` mapping each (`mode` is set by the
    evaluation). `threads`: torch CPU threads (None: torch's default)."""

    model: str | None = setting(None, optional(text))
    dtype: str = setting("float32", one_of(*DTYPES))
    device: str = setting("auto", check_device)
    threads: int | None = setting(None, optional(integer(1)))
    output_dir: str = setting("outputs/main", directory)
    calibration: dict[str, Any] = setting(parse=given(Calibration), factory=dict)
    evaluation: dict[str, Any] = setting(parse=given(Evaluations), factory=lambda: {"all": {}})
    settings: list[dict[str, Any]] = setting(parse=list_of(given(SweepSetting)), factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_names(self.settings, [setting_name(s) for s in self.settings])


FULL = "full"  # the row (column) of full attention
NAME_LENGTH = 120  # characters of a setting's name: it labels a table row or column, and names a cache file


def check_names(settings: list[dict[str, Any]], names: list[str], key: Callable[[str], str] = str.casefold) -> None:
    """Refuse settings whose `names` (what their rows, columns and caches are keyed by: the `name` given or the
    one derived) would be confused: two with one name (equal under `key`), a `name` that is "full" (full
    attention's), a name longer than `NAME_LENGTH` or with no letter or digit. The message names both settings."""
    seen: dict[str, int] = {}
    for i, (s, name) in enumerate(zip(settings, names)):
        if str(s.get("name") or "").casefold() == FULL or key(name) == key(FULL):
            raise ConfigError(f"settings[{i}] is named {shown(s.get('name') or name)}, the name of the full-attention "
                              "row: give it another name")
        if len(name) > NAME_LENGTH or not any(c.isalnum() for c in name):
            raise ConfigError(f"settings[{i}]: its name {shown(name)} ({len(name)} characters) must be at most "
                              f"{NAME_LENGTH} characters with a letter or digit (it labels the results and names a "
                              "cache file): give it a short `name`")
        if (j := seen.setdefault(key(name), i)) != i:
            named = (f"both named {shown(name)}" if names[j] == name else
                     f"named {shown(names[j])} and {shown(name)}, which share a cache file")
            raise ConfigError(f"settings[{j}] and settings[{i}] are {named}: give each setting a distinct `name`")


def setting_name(s: dict[str, Any]) -> str:
    """The setting's `name`, else a short description of what it sets apart from `patch_loki`'s defaults."""
    if s.get("name"):
        return s["name"]
    defaults = LokiSettings()
    parts = [f"d={s.get('d_frac', defaults.d_frac):g} k={s.get('k_frac', defaults.k_frac):g}"]
    parts += [f"{k}={v}" for k, v in s.items()
              if k in LokiSettings.keys() and k not in ("d_frac", "k_frac", "mode") and v != getattr(defaults, k)]
    if s.get("rotary", "pre") != "pre":
        parts.append(f"{s['rotary']}-RoPE")
    return "loki " + " ".join(parts)


def run_experiment(config: dict[str, Any], source: str = "config") -> list[dict[str, Any]]:
    """Check `config` (an `ExperimentConfig` mapping; `source` names it in errors), then calibrate, patch and
    measure."""
    import torch

    from ..models.smollm2 import load_model

    if not config:
        raise ConfigError(f"{source} is empty: give at least the Loki settings to compare with full attention "
                          "(`settings`, a list), as configs/loki/smollm2.yaml does")
    cfg = ExperimentConfig.from_dict(config, source).as_dict()
    out = Path(cfg["output_dir"])
    evaluations = {k: v for k, v in cfg["evaluation"].items() if v is not None}
    settings = cfg["settings"]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model, tokenizer = load_model(cfg["model"], dtype=cfg["dtype"], device=resolve_device(cfg["device"]))
    check_model(model, cfg, evaluations)
    bases = {}
    for rotary in sorted({s.get("rotary", "pre") for s in settings}):
        calibration = Calibration(**{**cfg["calibration"], "rotary": rotary})
        bases[rotary] = calibrate_to(model, tokenizer, calibration, out / f"basis-{rotary}", cfg["model"],
                                     dtype=cfg["dtype"], owned=True)
        print(describe(bases[rotary]))
    if bases:
        plot_explained_variance({f"{r}-RoPE": b for r, b in bases.items()}, out / "explained_variance.png")

    def patcher(s: dict[str, Any], mode: str):
        setting = SweepSetting(**s)
        return lambda m: patch_loki(m, bases[setting.rotary], setting, mode=mode)

    context = longest_context(evaluations)
    rows = [{"setting": FULL, "cost": 1.0}]
    for s in settings:  # record each setting as patch_loki resolves it (defaults included) and what it reads
        patcher(s, "all")(model)
        applied = loki_settings(model)
        unpatch(model)
        cost = read_cost(applied["d_frac"], applied["k_frac"], len(applied["dense_layers"]),
                         model.config.num_hidden_layers, applied["k_tokens"], context)
        at = {} if applied["k_tokens"] is None else {"cost_context": context}  # a token cap's cost depends on it
        rows.append({"setting": setting_name(s), "cost": round(cost, 4), **at, "rotary": s.get("rotary", "pre"),
                     **{k: v for k, v in applied.items() if k != "mode"}})

    if "decode" in evaluations:
        e = DecodeEvaluation(**evaluations["decode"])
        named = [(FULL, None)] + [(r["setting"], patcher(s, "decode")) for r, s in zip(rows[1:], settings)]
        prefixes = e.prefix if isinstance(e.prefix, list) else [e.prefix]
        for prefix in prefixes:
            key = "decode" if len(prefixes) == 1 else f"decode@{prefix}"
            windows = decode_windows(tokenizer, e.dataset, prefix + e.new_tokens + 1, e.windows, e.skip_windows,
                                     e.text_column)
            results = decode_perplexity(model, windows, prefix, named)
            for row in rows:
                row[key] = results[row["setting"]]
                print(f"{row['setting']}: {column_title(key)} {row[key]['ppl']:.3f}")
    if "all" in evaluations:
        e = Evaluation(**evaluations["all"])
        for row, s in zip(rows, [None] + settings):
            if s is not None:
                patcher(s, "all")(model)
            row["all"] = perplexity(model, tokenizer, e.dataset, e.seq_len, e.max_tokens, e.batch_size,
                                    desc=row["setting"], text_column=e.text_column)
            if s is not None:
                unpatch(model)
            print(f"{row['setting']}: mode-all ppl {row['all']['ppl']:.3f}")
    write_results(rows, cfg, out)
    return rows


def check_model(model, cfg: dict[str, Any], evaluations: dict[str, Any]) -> None:
    """Before any calibration or evaluation: the model's weights are finite, and every window the config reads fits
    in its positions."""
    lengths = {"calibration: seq_len": Calibration(**cfg["calibration"]).seq_len} if cfg["settings"] else {}
    if "decode" in evaluations:
        e = DecodeEvaluation(**evaluations["decode"])
        for prefix in e.prefix if isinstance(e.prefix, list) else [e.prefix]:
            lengths[f"evaluation: decode: prefix + new_tokens ({prefix} + {e.new_tokens})"] = prefix + e.new_tokens
    if "all" in evaluations:
        lengths["evaluation: all: seq_len"] = Evaluation(**evaluations["all"]).seq_len
    for what, length in lengths.items():
        check_positions(model, length, what)
    check_weights(model)


def longest_context(evaluations: dict[str, Any]) -> int:
    """Keys the longest step of the evaluations reads: the longest prefix plus the new tokens (decode), or the
    window (all); the context at which a k_tokens setting's read cost is given."""
    lengths = []
    if "decode" in evaluations:
        e = DecodeEvaluation(**evaluations["decode"])
        lengths.append(max(e.prefix if isinstance(e.prefix, list) else [e.prefix]) + e.new_tokens)
    if "all" in evaluations:
        lengths.append(Evaluation(**evaluations["all"]).seq_len)
    return max(lengths, default=1)


def column_title(key: str) -> str:
    """"decode" / "decode@P" / "all" -> the table's column title."""
    if key == "all":
        return "mode-all ppl"
    return "decode-equivalent ppl" + (f" (prefix {key.partition('@')[2]})" if "@" in key else "")


def evaluation_keys(row: dict[str, Any]) -> list[str]:
    """The evaluations a results row holds, decode first."""
    return [k for k in row if k.startswith("decode")] + (["all"] if "all" in row else [])


def table(rows: list[dict[str, Any]]) -> str:
    evals = evaluation_keys(rows[0])
    lines = ["| setting | read cost | " + " | ".join(f"{column_title(e)} | vs full" for e in evals) + " |",
             "|---|---|" + "---|---|" * len(evals)]
    for r in rows:
        cells = [f"{r[e]['ppl']:.3f} | {100 * (r[e]['ppl'] / rows[0][e]['ppl'] - 1):+.1f}%" for e in evals]
        at = f" at {r['cost_context']} keys" if "cost_context" in r else ""
        lines.append(f"| {r['setting']} | {r['cost']:.3f}{at} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path) -> None:
    write_json(out / "results.json", {"config": cfg, "results": rows})
    what = [f"{column_title(e)}: {rows[0][e]['tokens']} scored tokens" for e in evaluation_keys(rows[0])]
    write_text(out / "results.md", "Perplexity on held-out text; " + "; ".join(what) + "\n\n" + table(rows) + "\n")
    plot_perplexity(rows, {e: column_title(e) for e in evaluation_keys(rows[0])}, out / "perplexity.png")
    print(f"\n{table(rows)}\n\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'perplexity.png'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/loki/smollm2.yaml")
    parser.add_argument("--output-dir")


def run(args: argparse.Namespace) -> int:
    run_experiment(override(load_config(args.config), output_dir=args.output_dir), args.config)
    return 0
