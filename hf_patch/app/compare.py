"""`hf-patch compare --config configs/eval/smollm2.yaml`: the same lm-eval tasks for full attention and each Loki
setting, through lm-eval's Python API (`lm_eval.simple_evaluate`).

Writes under the config's `output_dir`: `results.md` (task x setting, value ± stderr and the change vs full),
`results.json` and `accuracy_vs_k.png` (each task's metric against k_f, one line per d_f). Long-context tasks
(`long_tasks`: `hfp_needle`, `hfp_ruler_*` or any task that reads lm-eval's `max_seq_lengths` metadata) run once
per context length in `lengths` and are drawn in `accuracy_vs_length.png` (each task's metric against the
length, one line per setting). Every (setting, task[, length]) result is cached in `cache/<setting>.json` as soon
as it is done, and reused only by later runs with the same fingerprint (`results_key`: model files, dtype, lm-eval
version, evaluation settings, Loki arguments, the basis's own fingerprint; per run the example count and the
prepared data's fingerprint): an interrupted comparison resumes where it stopped, a changed one recomputes. With a
`launch` key (`launch: {num_processes: 2}`) each setting runs data-parallel under `accelerate launch`
(`hf_patch.app.launch`).
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (DTYPES, ConfigError, Schema, directory, given, integer, list_of, load_config, mapping_of,
                      one_of, optional, override, setting, shown, text)
from ..data.store import digest, write_json, write_text
from ..loki.attention import MODES
from ..loki.calibrate import Calibration
from ..loki.settings import LmEvalLoki, LokiSettings, SweepSetting
from ..parallel import check_device
from .experiment import FULL, check_names, setting_name
from .launch import Launch
from .plots import pyplot, save_figure
from .task_runner import long_metric, read_cache, run_fingerprint, run_tasks, runs

LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
RESULTS_FORMAT = 1  # of the per-setting cache files; a change recomputes them


def _batch_size(name: str, value: Any) -> int | str:
    """lm-eval's batch size: an integer >= 1 or "auto"."""
    return value if value == "auto" else integer(1)(name, value)


@dataclass
class BasisPaths(Schema):
    """Where the bases of each rotary variant are (default: `output_dir/basis-<rotary>`, calibrated if missing)."""

    pre: str | None = setting(None, optional(text))
    post: str | None = setting(None, optional(text))


@dataclass
class CompareConfig(Schema):
    """The `hf-patch compare` config. tasks: task name -> number of examples (null: all); long_tasks: the same,
    run at each context length of `lengths` (tokens; lm-eval's `max_seq_lengths` metadata, the documents sized
    with the model's tokenizer); metrics: task -> the metric shown; settings: one `SweepSetting` mapping each (its
    mode defaults to the config's `mode`); launch: run each setting under `accelerate launch` (`Launch`; empty: in
    this process)."""

    tasks: dict[str, int | None] = setting(parse=mapping_of(optional(integer(1))), factory=dict)
    long_tasks: dict[str, int | None] = setting(parse=mapping_of(optional(integer(1))), factory=dict)
    lengths: list[int] = setting(parse=list_of(integer(64)), factory=lambda: [4096])
    model: str = setting("smollm2", text)
    dtype: str = setting("float32", one_of(*DTYPES))
    device: str = setting("auto", check_device)
    batch_size: int | str = setting(8, _batch_size)
    output_dir: str = setting("outputs/eval", directory)
    metrics: dict[str, str] = setting(parse=mapping_of(text), factory=dict)
    settings: list[dict[str, Any]] = setting(parse=list_of(given(SweepSetting)), factory=list)
    basis: dict[str, str] = setting(parse=given(BasisPaths), factory=dict)
    calibration: dict[str, Any] = setting(parse=given(Calibration), factory=dict)
    mode: str = setting(LmEvalLoki.mode, one_of(*MODES))  # hf-loki's default (hf_patch.loki.settings)
    num_fewshot: int = setting(0, integer(0))
    bootstrap_iters: int = setting(1000, integer(0))
    seed: int = setting(1234, integer(0))
    launch: dict[str, Any] = setting(parse=given(Launch), factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tasks and not self.long_tasks:
            raise ConfigError("tasks is missing or empty: give a mapping task name -> number of examples (null for "
                              "all), or long_tasks with lengths")
        if self.long_tasks and not self.lengths:
            raise ConfigError("long_tasks need lengths: a list of context lengths in tokens, e.g. [4096, 8192]")
        check_names(self.settings, [setting_label(s) for s in self.settings], lambda label: _slug(label).casefold())


# ---------------------------------------------------------------- settings and caching


def setting_label(setting: dict[str, Any] | None) -> str:
    """'full' or e.g. 'loki d=0.25 k=0.25' (the names of `hf-patch main`), plus the mode if the setting sets one."""
    if setting is None:
        return FULL
    return setting_name(setting) + (f" {setting['mode']}-mode" if "mode" in setting else "")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def default_metric(task: str, results: dict[str, Any], metrics: dict[str, str]) -> str:
    """The metric shown for `task`: the config's choice, else acc, else word_perplexity, else the first one."""
    if task in metrics:
        return metrics[task]
    names = [k.split(",")[0] for k in results if "," in k and "_stderr" not in k]
    for preferred in ("acc", "word_perplexity"):
        if preferred in names:
            return preferred
    if not names:
        raise ValueError(f"lm-eval returned no metrics for {task}")
    return names[0]


def metric_value(results: dict[str, Any], metric: str) -> tuple[float, float | None]:
    """(value, stderr or None) of `metric` under lm-eval's default filter "none"."""
    value = results.get(f"{metric},none")
    if value is None:
        raise KeyError(f"metric {metric!r} not in the results ({sorted(results)})")
    stderr = results.get(f"{metric}_stderr,none")
    return float(value), (float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None)


# ---------------------------------------------------------------- running


def ensure_bases(cfg: dict[str, Any], settings: list[dict[str, Any]]) -> dict[str, Path]:
    """{rotary: basis dir} for the rotary variants the settings use. A basis is reused only when calibrated from
    the config's model, dtype and `calibration` (its fingerprint); compare's own (`output_dir/basis-<rotary>`)
    is calibrated when missing or calibrated from other inputs, one the config names (`basis`) is refused then."""
    from .calibrate import basis_fingerprint, calibrate_to, stored_basis

    rotaries = sorted({s.get("rotary", "pre") for s in settings})
    out = Path(cfg["output_dir"])
    paths = {r: Path(cfg["basis"].get(r, out / f"basis-{r}")) for r in rotaries}
    cals = {r: Calibration(**{**cfg["calibration"], "rotary": r}) for r in rotaries}
    fixes = {r: f"leave basis.{r} out of the config to calibrate one under output_dir, or recalibrate it with the "
                f"config's model and calibration settings (`hf-patch calibrate --force --output {paths[r]}`)"
             for r in rotaries}
    missing = [r for r in rotaries if stored_basis(paths[r], basis_fingerprint(cfg["model"], cfg["dtype"], cals[r]),
                                                   r not in cfg["basis"], fixes[r]) is None]
    if missing:
        from ..models.smollm2 import load_model
        from ..parallel import resolve_device

        model, tokenizer = load_model(cfg["model"], dtype=cfg["dtype"], device=resolve_device(cfg["device"]))
        for r in missing:
            calibrate_to(model, tokenizer, cals[r], paths[r], cfg["model"], force=True, dtype=cfg["dtype"])
        del model
    return paths


def _basis_key(path: Path) -> dict[str, Any]:
    from ..loki.basis import PCABasis

    meta = PCABasis.load(path).metadata
    return {"path": str(path), "fingerprint": digest(meta.get("fingerprint")), "tokens": meta.get("tokens")}


def results_key(cfg: dict[str, Any], loki: dict[str, Any] | None, basis: Path | None) -> dict[str, Any]:
    """Everything one setting's results are computed from, apart from each run's own (`run_fingerprint`): the
    model (`model_identity`), the evaluation settings, lm-eval's version, the Loki arguments and the basis (by its
    fingerprint). A cache file with another key is recomputed."""
    from importlib.metadata import version

    from ..models.smollm2 import model_identity

    return {"format": RESULTS_FORMAT, "model": model_identity(cfg["model"], cfg["dtype"]),
            "lm_eval": version("lm_eval"),
            "num_fewshot": cfg["num_fewshot"], "seed": cfg["seed"], "bootstrap_iters": cfg["bootstrap_iters"],
            "loki": loki, "basis": None if basis is None else _basis_key(basis)}


def applied_setting(cfg: dict[str, Any], setting: dict[str, Any]) -> SweepSetting:
    """A setting as it is applied: `patch_loki`'s defaults and the config's mode where it leaves them out."""
    return SweepSetting(**{"mode": cfg["mode"], **setting})


LATER_FIELDS = ("ranking",)  # `LokiSettings` fields newer than the cache keys: out of a key at their default


def model_args(setting: SweepSetting, basis: Path) -> dict[str, Any]:
    """A setting as `hf-loki` model args, plain values (JSON: the cache key, a launched job): its `patch_loki`
    settings, rotary and basis. A setting left at None, or a field added since caches were written (`LATER_FIELDS`)
    left at its default, is left out, so that caches written before it existed stay valid."""
    given = {k: v for k, v in setting.patch_settings().as_dict().items()
             if v is not None and not (k in LATER_FIELDS and v == getattr(LokiSettings, k))}
    return {**given, "rotary": setting.rotary, "basis": str(basis)}


def evaluate_setting(cfg: dict[str, Any], setting: dict[str, Any] | None, basis: Path | None) -> dict:
    """{run key: {"limit", "n", "results"}} for one setting, running only the runs its cache lacks (in this
    process, or in the processes the config's `launch` starts)."""
    label = setting_label(setting)
    loki = None if setting is None else model_args(applied_setting(cfg, setting), basis)
    key = results_key(cfg, loki, basis)
    path = Path(cfg["output_dir"]) / "cache" / f"{_slug(label)}.json"
    cache = read_cache(path, key)
    todo = [r.key for r in runs(cfg) if cache["tasks"].get(r.key, {}).get("run") != run_fingerprint(r)]
    if not todo:
        print(f"{label}: all {len(runs(cfg))} runs cached in {path}")
    elif cfg["launch"]:
        from .launch import run_launched

        job = {"cfg": cfg, "label": label, "loki": loki, "todo": todo, "path": str(path), "key": key}
        run_launched(cfg["launch"], job)
        cache = read_cache(path, key)
    else:
        run_tasks(cfg, label, loki, todo, str(path), key)
        cache = read_cache(path, key)
    return {r.key: cache["tasks"][r.key] for r in runs(cfg)}


def _needs_prepared_tasks(tasks: list[str]) -> None:
    """Build the local task data the run needs (once; offline afterwards), before any model is loaded."""
    from ..eval.prepare import ensure_prepared

    ensure_prepared(tasks)


def check_tasks(tasks: list[str], source: str) -> None:
    """Fail before any model loads for a task that lm-eval's task index (with ours, prepared) lacks, naming the
    closest one there is."""
    from .task_runner import task_manager

    known = task_manager(all(t.startswith("hfp_") for t in tasks)).all_tasks
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            raise ConfigError(f"{source}: unknown task {shown(task)}" + (f"; did you mean {close[0]!r}?" if close
                              else "") + " (`hf-patch eval ls tasks` lists the tasks there are)")


def run_compare(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check `config` (a `CompareConfig` mapping; `source` names it in errors), run every setting (full first)
    and write the table, JSON and plot; return the JSON payload."""
    cfg = CompareConfig.from_dict(config, source).as_dict()
    settings = cfg["settings"]
    _needs_prepared_tasks([*cfg["tasks"], *cfg["long_tasks"]])
    check_tasks([*cfg["tasks"], *cfg["long_tasks"]], source)
    bases = ensure_bases(cfg, settings)
    rows = [{"setting": FULL, "params": None, "tasks": evaluate_setting(cfg, None, None)}]
    for s in settings:
        basis = bases[s.get("rotary", "pre")]
        rows.append({"setting": setting_label(s), "params": applied_setting(cfg, s).as_dict(),
                     "tasks": evaluate_setting(cfg, s, basis)})
    return write_outputs(cfg, rows)


# ---------------------------------------------------------------- reporting


def summarize(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per run (task, or long task at a length): metric, n, and per setting value, stderr, delta vs full
    (points or %) and, for documents with depths, the metric per depth."""
    summary = []
    for run in runs(cfg):
        first = rows[0]["tasks"][run.key]["results"]
        metric = (default_metric(run.task, first, cfg["metrics"]) if run.length is None
                  else cfg["metrics"].get(run.task, long_metric(first, run.length)))
        full, _ = metric_value(first, metric)
        entry = {"task": run.task, "length": run.length, "key": run.key, "metric": metric,
                 "n": rows[0]["tasks"][run.key]["n"], "settings": {}}
        for row in rows:
            results = row["tasks"][run.key]["results"]
            value, stderr = metric_value(results, metric)
            relative = metric.endswith(LOWER_IS_BETTER)
            delta = 100 * (value / full - 1) if relative else value - full
            entry["settings"][row["setting"]] = {"value": value, "stderr": stderr, "delta": delta,
                                                 "delta_unit": "%" if relative else "abs",
                                                 **({"by_depth": results["by_depth"]} if "by_depth" in results else {})}
        summary.append(entry)
    return summary


def _cell(metric: str, value: float, stderr: float | None) -> str:
    if metric.endswith(LOWER_IS_BETTER):
        return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def _delta(d: dict[str, Any]) -> str:
    return f"{d['delta']:+.1f}%" if d["delta_unit"] == "%" else f"{100 * d['delta']:+.1f}"


def table(summary: list[dict[str, Any]], labels: list[str]) -> str:
    """Markdown: one row per task, `value ± stderr` per setting and, for Loki, the change vs full."""
    head = ["task", "metric", "n", labels[0]]
    for label in labels[1:]:
        head += [label, "Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        unit = "" if e["metric"].endswith(LOWER_IS_BETTER) else " (%)"
        cells = [e["key"], e["metric"] + unit, str(e["n"])]
        for i, label in enumerate(labels):
            s = e["settings"][label]
            cells.append(_cell(e["metric"], s["value"], s["stderr"]))
            if i:
                cells.append(_delta(s))
        lines.append("| " + " | ".join(cells) + " |")
    accuracy = [e for e in summary if not e["metric"].endswith(LOWER_IS_BETTER) and e["length"] is None]
    if len(accuracy) > 1:
        cells = ["mean of accuracies", "", ""]
        full = sum(e["settings"][labels[0]]["value"] for e in accuracy) / len(accuracy)
        for i, label in enumerate(labels):
            mean = sum(e["settings"][label]["value"] for e in accuracy) / len(accuracy)
            cells.append(f"{100 * mean:.1f}")
            if i:
                cells.append(f"{100 * (mean - full):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per task: the metric against k_f, one line per d_f (and variant), full attention dashed."""
    plt = pyplot()
    cols = min(3, len(summary))
    n_rows = math.ceil(len(summary) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.3 * n_rows), squeeze=False)
    for ax, e in zip(axes.flat, summary):
        scale = 1 if e["metric"].endswith(LOWER_IS_BETTER) else 100
        ax.axhline(scale * e["settings"][FULL]["value"], color="black", linestyle="--", label="full")
        lines: dict[str, list[tuple[float, float]]] = {}
        modes = {row["params"]["mode"] for row in rows[1:]}
        for row in rows[1:]:
            p = row["params"]
            name = f"d_f={p['d_frac']:g}" + "".join(
                f" {p[k]}" for k, default in (("rotary", "pre"), ("d_policy", "uniform"), ("gqa_select", "query"))
                if p.get(k, default) != default) + (f" {p['mode']}-mode" if len(modes) > 1 else "") + (
                f" k_tokens={p['k_tokens']}" if p.get("k_tokens") else "")
            lines.setdefault(name, []).append((p["k_frac"], scale * e["settings"][row["setting"]]["value"]))
        for name, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(f"{e['task']} (n={e['n']})", fontsize=9)
        ax.set_xlabel("k_f")
        ax.set_ylabel(e["metric"] + ("" if scale == 1 else " (%)"))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(summary):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def plot_lengths(summary: list[dict[str, Any]], labels: list[str], path: Path) -> None:
    """One panel per long task: its metric (%) against the context length, one line per setting, ± stderr."""
    plt = pyplot()
    tasks = list(dict.fromkeys(e["task"] for e in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        entries = sorted((e for e in summary if e["task"] == task), key=lambda e: e["length"])
        for label in labels:
            points = [e["settings"][label] for e in entries]
            ax.errorbar([e["length"] for e in entries], [100 * p["value"] for p in points],
                        yerr=[100 * (p["stderr"] or 0) for p in points], marker="o", capsize=3,
                        linestyle="--" if label == FULL else "-", label=textwrap.fill(label, 40))
        ax.set_xscale("log", base=2)
        ax.set_xticks([e["length"] for e in entries], [str(e["length"]) for e in entries])
        ax.set_title(f"{task} (n={entries[0]['n']} per length)", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{entries[0]['metric'] if entries[0]['metric'] == 'acc' else 'score'} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = Path(cfg["output_dir"])
    summary = summarize(cfg, rows)
    labels = [r["setting"] for r in rows]
    md = table(summary, labels)
    payload = {"config": cfg, "summary": summary, "results": rows}
    write_json(out / "results.json", payload)
    write_text(out / "results.md", (
        f"lm-eval, model {cfg['model']} ({cfg['dtype']}), Loki mode {cfg['mode']}, {cfg['num_fewshot']}-shot; "
        "accuracies in %, Δ in points (perplexity: Δ in %); task@N: at a context of N tokens\n\n" + md + "\n"))
    written = [out / "results.md", out / "results.json"]
    if short := [e for e in summary if e["length"] is None]:
        plot(short, rows, out / "accuracy_vs_k.png")
        written.append(out / "accuracy_vs_k.png")
    if long := [e for e in summary if e["length"] is not None]:
        plot_lengths(long, labels, out / "accuracy_vs_length.png")
        written.append(out / "accuracy_vs_length.png")
    print(f"\n{md}\n\nwrote {', '.join(map(str, written))}")
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/eval/smollm2.yaml")
    parser.add_argument("--output-dir", help="override the config's output_dir")


def run(args: argparse.Namespace) -> int:
    run_compare(override(load_config(args.config), output_dir=args.output_dir), args.config)
    return 0
