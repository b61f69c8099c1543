#!/usr/bin/env bash
# README command 1: set everything up on a fresh machine, then run the main job on the embedded default
# (SmolLM2-135M, local public-domain books): calibrate -> patch -> perplexity, full vs Loki settings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hf-patch prepare-data
exec .venv/bin/hf-patch main --config "${1:-configs/loki/smollm2.yaml}"
