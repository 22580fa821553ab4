"""The rollout memory benchmark's --quick mode (benchmarks/rollout_memory.py): three rollouts of 8, 16
and 32 prompts, each in a fresh process; the rollout's peak memory grows linearly with the prompts."""

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_rollout_memory_quick():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "rollout_memory.py"), "--quick"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [int(m) for m in re.findall(r"(\d+) tokens decoded", proc.stdout)] == [8 * 64, 16 * 64, 32 * 64]
    match = re.fullmatch(r"prompts=8,16,32 rollout_mb=(\d+),(\d+),(\d+) growth_ratio=([\d.]+) linear=(yes|no)",
                         lines[-1])
    assert match, lines[-1]
    small, medium, large = (int(match.group(i)) for i in (1, 2, 3))
    assert 0 < small <= medium <= large, lines[-1]
