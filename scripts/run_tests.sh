#!/usr/bin/env bash
# Fresh-machine test command: creates the virtualenv if needed, checks the layer contracts (lint-imports),
# then runs the whole test suite on CPU
# (real megatron-core; TP=2 / PP=2 tests launch torchrun with 2 ranks over gloo).
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -m "not slow" -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPDLM_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh" "$VENV"
cd "$ROOT"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
# the package's layer contracts (.importlinter): each stage imports only the stages below it
"$VENV/bin/lint-imports" --config "$ROOT/.importlinter"
exec "$VENV/bin/python" -m pytest -q "$@"
