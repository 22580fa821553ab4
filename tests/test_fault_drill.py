"""The kill -9 drill's --quick mode (benchmarks/fault_drill.py): a run SIGKILLed four times, twice
inside a checkpoint save, resumes each time and ends bit for bit where an uninterrupted run ends."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_fault_drill_quick():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "fault_drill.py"), "--quick"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "kills=4 survived=4 corrupt=0 identical=yes", proc.stdout[-3000:]
    assert sum("(save," in line for line in lines) == 2, proc.stdout
