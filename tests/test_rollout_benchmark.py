"""benchmarks/rollout_throughput.py --quick: every part runs (batch-1 engine / naive / HF, the
forward breakdown, batch throughput), the engine's tokens equal the naive decoder's, and the last
line has the decoding-speed issue's fixed form. Speed itself is not asserted (benchmarks, not tests)."""

import re

from tests.conftest import REPO_ROOT
from tests.test_main_job import _python


def test_rollout_throughput_quick():
    stdout = _python(str(REPO_ROOT / "benchmarks" / "rollout_throughput.py"), "--quick", "--batch-prompts", "3")
    assert "same tokens as (a): True" in stdout, stdout
    breakdown = next(line for line in stdout.splitlines() if line.startswith("one cached block-4 forward"))
    for part in ("weight matmuls", "output layer", "attention", "CPU shim", "everything else"):
        assert part in breakdown, breakdown
    assert "batch 3 (prompt lengths" in stdout
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_naive=[\d.]+ speedup_vs_ar=[\d.]+ tokens_per_forward=[\d.]+ "
                        r"forward_over_ar_step=[\d.]+ batch32_vs_hf=[\d.]+", last), last
