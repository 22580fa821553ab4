#!/usr/bin/env bash
# The GPU checks in one command, on a CUDA machine: the gpu-marked tests (FlexAttention == dense, the
# activation count on the GPU, and with Transformer Engine: FP8 student loss vs BF16 over 20 steps, the
# FP8 teacher's KL to BF16), the student-step throughput benchmark (TFLOP/s, MFU, FP8 speed-up) and the
# rollout benchmark (the engine vs HF generate with its KV cache, bf16, SmolLM2's and a ~1.7B Qwen3 shape,
# batch 1 and 64, 1 / 2 / 4 tokens per forward) and the decoding speed of ModelOpt-quantized students (FP8, INT8
# SmoothQuant, NVFP4 fake quantization against the unquantized student; skips without ModelOpt).
#
#   bash scripts/gpu_checks.sh [OUT_DIR]      # logs in OUT_DIR (default: $OUT, else runs/gpu_checks)
#
# Uses the current python (PYTHON=...) as it is: install the project into it first
# (pip install -e '.[te]'), or, on a machine that cannot reach a package index, put wheels of what its
# image lacks (megatron-core at least) in .whl/: they are installed into /tmp/site first.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/runs/gpu_checks}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import megatron.core; print("megatron-core", megatron.core.__version__)
except ImportError as e: print("megatron-core missing:", e)
try:
    import transformer_engine; print("transformer-engine", transformer_engine.__version__)
except ImportError: print("transformer-engine: not installed (TE / FP8 checks skip)")
PY
"$PY" -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.txt"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_student_step.py 2>&1 | tee "$OUT_DIR/gpu_student_step.txt"
bench=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_rollout.py 2>&1 | tee "$OUT_DIR/gpu_rollout.txt"
rollout=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_quantized_decode.py 2>&1 | tee "$OUT_DIR/gpu_quantized_decode.txt"
quantized=${PIPESTATUS[0]}
echo "gpu_checks: tests exit $tests, benchmarks exit $bench / $rollout / $quantized; logs in $OUT_DIR"
exit $(( tests != 0 || bench != 0 || rollout != 0 || quantized != 0 ))
