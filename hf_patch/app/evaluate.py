"""`hf-patch eval ...`: lm-eval's own command line, with the `hf-loki` model and the local tasks registered.

Every argument is forwarded unchanged to lm-eval's CLI (`run`, `ls`, `validate`, or the legacy form without a
subcommand); `--include_path` gains the hf-patch task directory (merged with yours if you pass one):

    hf-patch eval run --model hf-loki --model_args pretrained=smollm2,basis=outputs/smollm2/basis-pre \
        --tasks hfp_book_cloze,hfp_bigbench --batch_size 8
    hf-patch eval ls tasks
    hf-patch eval run --help          # lm-eval's help
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..parallel import end_processes, launched

PASS_THROUGH = True
HELP_FLAGS = ("-h", "--help")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of our own: `-h/--help` is handed on to lm-eval too (see `run`)."""
    parser.description = __doc__.split("\n\n")[0]
    parser.conflict_handler = "resolve"  # a group made now takes -h/--help over, so lm-eval answers it
    group = parser.add_argument_group("lm-eval")
    group.add_argument(*HELP_FLAGS, dest="lm_eval_help", action="store_true", help=argparse.SUPPRESS)


def with_include_path(argv: list[str], tasks_dirs: list[Path] | None = None) -> list[str]:
    """`argv` with `--include_path` pointing at our tasks (default: the packaged ones and the prepared standard
    ones); a path the user gave is kept alongside them.

    lm-eval's CLI takes a single include path, so several are joined in a temporary directory of symlinks."""
    if tasks_dirs is None:
        from ..eval.prepare import include_paths

        tasks_dirs = include_paths()
    user_path = None
    rest = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--include_path" and i + 1 < len(argv):
            user_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--include_path="):
            user_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    dirs = [*tasks_dirs, *([Path(user_path)] if user_path is not None else [])]
    path = str(dirs[0]) if len(dirs) == 1 else str(_joined_dirs(dirs))
    return [*rest, "--include_path", path]


def _joined_dirs(dirs: list[Path]) -> Path:
    """A temporary directory mirroring each of `dirs` (real subdirectories, symlinked files): lm-eval scans it
    recursively without following directory symlinks, and finds each task's Python helpers beside its YAML."""
    joined = Path(tempfile.mkdtemp(prefix="hf_patch_tasks-"))
    atexit.register(shutil.rmtree, joined, True)
    for i, d in enumerate(dirs):
        d = d.expanduser().resolve()
        if not d.is_dir():
            raise FileNotFoundError(f"--include_path {d} is not a directory")
        for root, _, files in os.walk(d, followlinks=True):
            target = joined / f"{i}_{d.name}" / Path(root).relative_to(d)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.symlink(Path(root) / name, target / name)
    return joined


def _check_tasks_prepared(argv: list[str]) -> None:
    """Fail before lm-eval loads a model if a `--tasks` entry is an hf-patch task whose data is not prepared."""
    from ..eval.prepare import check_prepared

    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--tasks", "-t") and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--tasks=") else None)
        if value:
            check_prepared(t.strip() for t in value.split(","))


def run(args: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    from ..eval.lm_eval_model import register

    register()
    argv = list(args.extra)
    if argv and not (len(argv) == 1 and argv[0] == "run"):  # bare `lm-eval` / `lm-eval run` only print help
        if not args.lm_eval_help:
            _check_tasks_prepared(argv)
        argv = with_include_path(argv)
    if args.lm_eval_help:
        argv.append("--help")
    old_argv = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old_argv
    if launched():  # under accelerate launch: the first process writes the results while the others wait
        end_processes()
    return 0
