"""`hf-patch convert-model`: the embedded SmolLM2-135M GGUF as a cached safetensors model (`hf_patch.models.smollm2`)."""
from __future__ import annotations

import argparse

from ..models.smollm2 import HUB_ID, convert_model, default_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help=f"directory for the safetensors copy (default {default_output()})")
    parser.add_argument("--force", action="store_true", help="convert again even if the output holds a copy converted "
                        "from the same GGUF (one from another GGUF in --output is refused without it; a non-empty "
                        "directory hf-patch did not write is refused even with it)")


def run(args: argparse.Namespace) -> int:
    output = convert_model(args.output, force=args.force)
    print(f"SmolLM2-135M-Instruct ({HUB_ID}) as safetensors: {output}")
    return 0
