"""The `hf-patch` console script. Each subcommand lives in its own module, imported only when used.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``. A user error (a
`ValueError`, e.g. a `ConfigError`, or an `OSError` such as a missing file) prints ``hf-patch: error: <message>``
and exits with status 2, as argparse does for bad flags; `hf-patch --debug COMMAND ...` shows its traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Collection
from dataclasses import MISSING, fields
from typing import Any

from ..config import Schema

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("hf_patch.app.prepare_data", "download the public-domain book corpus and write calibration/eval splits"),
    "convert-model": ("hf_patch.app.convert_model", "convert the embedded SmolLM2-135M GGUF to a cached safetensors model"),
    "calibrate": ("hf_patch.app.calibrate", "calibrate a Loki PCA basis over a dataset; save it and plot variance"),
    "perplexity": ("hf_patch.app.perplexity", "perplexity of a model, full attention or Loki, on held-out text"),
    "main": ("hf_patch.app.experiment", "the main job: calibrate, patch and compare perplexity over Loki settings"),
    "eval": ("hf_patch.app.evaluate", "run lm-eval with the hf-loki model and local tasks registered (lm-eval's own args)"),
    "prepare-tasks": ("hf_patch.app.prepare_tasks", "build the local lm-eval tasks offline (hfp_core, hfp_mmlu, books, cloze; BIG-bench from a local sdist)"),
    "compare": ("hf_patch.app.compare", "full attention vs Loki settings on lm-eval tasks: table, JSON and plot"),
}


def add_schema_flags(parser: argparse.ArgumentParser, schema: type[Schema], exclude: Collection[str] = ()) -> None:
    """One `--field-name` flag per field of `schema` (except `exclude`), with the field's help and default. The
    values stay as typed (None when not given): the schema's own parsers check them (`schema_flags`)."""
    for f in fields(schema):
        if f.name not in exclude:
            default = "" if f.default is MISSING else f" (default: {f.default})"
            parser.add_argument(f"--{f.name.replace('_', '-')}", help=f"{f.metadata.get('help') or ''}{default}")


def schema_flags(args: argparse.Namespace, schema: type[Schema], exclude: Collection[str] = ()) -> dict[str, Any]:
    """The flags of `add_schema_flags` that were given: {field name: value as typed}."""
    return {name: value for name in schema.keys()
            if name not in exclude and (value := getattr(args, name, None)) is not None}


USER_ERRORS = (ValueError, OSError)
USAGE_ERROR = 2  # argparse's exit status for bad arguments


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors become one `hf-patch: error:` line and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[debug:]
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return _run(argv)
        except USER_ERRORS as err:
            if debug:
                raise
            print(f"hf-patch: error: {err}", file=sys.stderr)
            return USAGE_ERROR


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (UserWarning) as one `hf-patch: warning:` line; others as Python prints them."""
    text = (f"hf-patch: warning: {message}\n" if category is UserWarning
            else warnings.formatwarning(message, category, filename, lineno, line))
    print(text, end="", file=sys.stderr if file is None else file)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-patch", description="Cheaper long-context LLMs for Transformers.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (give it first)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the error and exits
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"hf-patch {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    if getattr(module, "PASS_THROUGH", False):  # e.g. `eval` forwards lm-eval's own arguments unchanged
        args, extra = sub_parser.parse_known_args(rest)
        args.extra = extra
    else:
        args = sub_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
