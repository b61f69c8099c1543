#!/usr/bin/env bash
# README command 2 (and .ci/run): install, then run the tests on the CPU on both ends of the supported transformers
# range: the whole suite on the newest release (.venv, or $HF_PATCH_VENV), then the tests of what follows
# transformers' generation API (generation, patching, caches, CUDA-graph steps, TransNormer) on the oldest
# ("$venv-oldest-transformers", scripts/setup.sh). Arguments go to pytest and then replace the default selection of
# both runs (e.g. `bash scripts/test.sh tests/test_loki_patch.py -k generate`). Fails if either run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --oldest-transformers
venv=${HF_PATCH_VENV:-.venv}
ON_OLDEST=(tests/test_loki_generate.py tests/test_decode_loop.py tests/test_selection.py tests/test_loki_patch.py
           tests/test_loki_budget.py tests/test_loki_cuda_graph.py
           tests/test_loki_end_to_end.py tests/test_transnormer.py tests/test_transnormer_cuda_graph.py)

run() {  # run PYTHON PYTEST-ARGS...: one pytest run, headed by the transformers release it tests
    local python=$1
    shift
    echo "== transformers $("$python" -c 'import transformers; print(transformers.__version__)'): pytest $*"
    "$python" -m pytest -q -ra "$@"
}

status=0
if [ $# -gt 0 ]; then
    run "$venv/bin/python" "$@" || status=1
    run "$venv-oldest-transformers/bin/python" "$@" || status=1
else
    run "$venv/bin/python" || status=1
    run "$venv-oldest-transformers/bin/python" "${ON_OLDEST[@]}" || status=1
fi
exit $status
