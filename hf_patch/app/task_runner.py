"""The task runner of `hf-patch compare`: one setting's lm-eval runs with one `hf-loki` model, each result added to
the setting's cache file as soon as it is done. `compare` calls it in its own process; under `accelerate launch`
(`hf_patch.app.launch`) every launched process calls it (lm-eval splits the requests between them)."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.store import reusable, write_json


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The setting's cache file if it was computed with `key` (compare's own file: one with another key is
    recomputed, said in one line), else an empty cache for `key`."""
    key = json.loads(json.dumps(key, default=str))  # as the file holds it
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except ValueError:  # not JSON: not a cache of ours to trust
            cached = None
        stored = cached.get("key") if isinstance(cached, dict) else None
        if stored == key:
            return cached
        reusable(path, stored, key, owned=True, fix="", what="the cached results")  # says what differed
    return {"key": key, "tasks": {}}


def run_fingerprint(run: "Run") -> dict[str, Any]:
    """What one run's result is computed from beyond its setting's key: its document count and the fingerprint of
    the prepared data its task reads (`tasks_fingerprint`)."""
    from ..eval.prepare import tasks_fingerprint

    return {"limit": run.limit, "data": tasks_fingerprint([run.task])}


@dataclass(frozen=True)
class Run:
    """One lm-eval run of a comparison: `task` on its first `limit` documents, at context `length` for a long task
    (None otherwise); `key` names its result in the caches and outputs ("task" or "task@length")."""

    task: str
    limit: int | None
    length: int | None = None

    @property
    def key(self) -> str:
        return self.task if self.length is None else f"{self.task}@{self.length}"


def runs(cfg: dict[str, Any]) -> list[Run]:
    """The config's runs: `tasks`, then each of `long_tasks` at each of `lengths`."""
    return [Run(t, n) for t, n in cfg["tasks"].items()] + [
        Run(t, n, length) for t, n in cfg["long_tasks"].items() for length in cfg["lengths"]]


def long_metric(results: dict[str, Any], length: int) -> str:
    """The metric of a long task at `length`: lm-eval's RULER names it by the length; others report acc."""
    return str(length) if f"{length},none" in results else "acc"


def sample_stats(samples: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """From lm-eval's per-document samples: the standard error of `metric`'s mean (lm-eval's `mean_stderr`; its
    RULER aggregation reports none) and, where documents carry a `depth`, the mean per depth."""
    from lm_eval.api.metrics import mean_stderr

    scores = [float(s[metric]) for s in samples]
    stats: dict[str, Any] = {f"{metric}_stderr,none": mean_stderr(scores) if len(scores) > 1 else None}
    by_depth: dict[float, list[float]] = {}
    for sample, score in zip(samples, scores):
        if "depth" in sample["doc"]:
            by_depth.setdefault(float(sample["doc"]["depth"]), []).append(score)
    if by_depth:
        stats["by_depth"] = {str(d): {"n": len(v), metric: sum(v) / len(v)} for d, v in sorted(by_depth.items())}
    return stats


def run_tasks(cfg: dict[str, Any], label: str, loki: dict[str, Any] | None, todo: list[str], path: str,
              key: dict[str, Any]) -> None:
    """Evaluate the runs `todo` (their keys) with one `hf-loki` model, adding each result to the cache file at
    `path` as soon as it is done. Under `accelerate launch` every process runs this (the requests are split
    between them) and the first one writes. A long task sizes its documents to its length with the model's
    tokenizer (lm-eval's RULER metadata), and its samples give the stderr and per-depth means (`sample_stats`)."""
    from lm_eval import simple_evaluate
    from tqdm.auto import tqdm

    from ..eval.lm_eval_model import LokiHFLM
    from ..models.smollm2 import resolve_model
    from ..parallel import resolve_device

    cache = read_cache(Path(path), key)
    by_key = {r.key: r for r in runs(cfg)}
    local_only = all(r.task.startswith("hfp_") for r in by_key.values())
    lm = LokiHFLM(pretrained=str(cfg["model"]), dtype=cfg["dtype"], device=resolve_device(cfg["device"]),
                  batch_size=cfg["batch_size"], **(loki or {}))
    for run in tqdm([by_key[k] for k in todo], desc=label, unit="task", disable=lm.rank > 0):
        metadata = None if run.length is None else {"max_seq_lengths": [run.length],
                                                    "tokenizer": resolve_model(str(cfg["model"]))}
        out = simple_evaluate(model=lm, tasks=[run.task], limit=run.limit, num_fewshot=cfg["num_fewshot"],
                              bootstrap_iters=cfg["bootstrap_iters"], task_manager=task_manager(local_only, metadata),
                              log_samples=run.length is not None, random_seed=cfg["seed"],
                              numpy_random_seed=cfg["seed"], torch_random_seed=cfg["seed"],
                              fewshot_random_seed=cfg["seed"])
        if out is None:  # not the first of the launched processes
            continue
        if run.task not in out["results"]:
            raise ValueError(f"{run.task} is a group or tag: list its tasks one by one in the config")
        results = out["results"][run.task]
        if run.length is not None:
            results.update(sample_stats(out["samples"][run.task], long_metric(results, run.length)))
        cache["tasks"][run.key] = {"limit": run.limit, "run": run_fingerprint(run),
                                   "n": out["n-samples"][run.task]["effective"], "results": results}
        write_json(Path(path), cache)


def task_manager(local_only: bool = False, metadata: dict[str, Any] | None = None):
    """lm-eval's task index with the hf-patch tasks (the packaged ones and the prepared standard ones), built once
    per process, set of task directories and `metadata` (handed to every task, as lm-eval's `--metadata`).
    Indexing lm-eval's own tasks scans thousands of YAML files: `local_only` skips them when every task is one
    of ours (ours include lm-eval's YAMLs by path)."""
    from ..eval.prepare import include_paths

    return _task_manager(local_only, tuple(str(p) for p in include_paths()), json.dumps(metadata, sort_keys=True))


@functools.cache
def _task_manager(local_only: bool, paths: tuple[str, ...], metadata: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=not local_only, metadata=json.loads(metadata))
