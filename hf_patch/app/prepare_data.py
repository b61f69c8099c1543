"""`hf-patch prepare-data`: the local book corpus (`hf_patch.data.books`)."""
from __future__ import annotations

import argparse

from ..data.books import prepare_books, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="directory for the jsonl files (default $HF_PATCH_CACHE/data/books)")
    parser.add_argument("--force", action="store_true", help="download and rebuild even if the corpus there was built "
                        "from the same inputs (one from other inputs in --output is refused without it; a non-empty "
                        "directory hf-patch did not write is refused even with it)")


def run(args: argparse.Namespace) -> int:
    paths = prepare_books(args.output, force=args.force)
    print(summary(paths))
    return 0
