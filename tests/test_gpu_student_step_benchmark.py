"""benchmarks/gpu_student_step.py off the GPU: ``--quick --device cpu`` runs its one CPU variant
(local spec, dense attention) through the trainer's student step and prints the fixed last line with
the GPU-only numbers as nan; ``--device cuda`` without a GPU is refused with one line (exit 2)."""

import math
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "benchmarks" / "gpu_student_step.py")
LAST = (r"variant=(\S+) bf16_tflops=(\S+) bf16_mfu=(\S+) fp8_tflops=(\S+) fp8_speedup=(\S+) flex_over_dense=(\S+) "
        r"activation_estimate_over_peak=(\S+)")


def test_quick_cpu_run_prints_the_last_line():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    match = re.fullmatch(LAST, lines[-1])
    assert match, lines[-1]
    assert match.group(1) == "local-dense"
    assert float(match.group(2)) > 0
    assert all(math.isnan(float(match.group(i))) for i in (3, 4, 5, 6, 7))  # no GPU peak, no FP8, no flex
    assert sum("skipped: GPU only" in line for line in lines) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_student_step: error: --device cuda needs a CUDA GPU")
