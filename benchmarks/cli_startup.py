"""How fast every console script answers ``--help``, against ``import torch`` measured in the same run.

    python benchmarks/cli_startup.py [--repeats 5]

Each script runs as the user types it (the entry point in the virtualenv's ``bin/``); the wall time is
the median over ``--repeats`` runs, and its output is checked for warning lines. The last line reads
``cli_help_max_s=A cli_help_median_s=B torch_import_s=C help_over_torch_import=D warning_lines=E``
(goal: A < 2 s, E = 0).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def console_scripts():
    text = open(os.path.join(ROOT, "setup.py")).read()
    return [name for name, _, _ in re.findall(r'"(opdlm-[a-z0-9-]+)=([\w.]+):(\w+)"', text)]


def timed(cmd, repeats: int):
    times, output = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        times.append(time.perf_counter() - start)
        output = proc.stdout + proc.stderr
    return statistics.median(times), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bindir = os.path.dirname(sys.executable)
    torch_s, _ = timed([sys.executable, "-c", "import torch"], args.repeats)
    results = {}
    warnings = 0
    for name in console_scripts():
        seconds, output = timed([os.path.join(bindir, name), "--help"], args.repeats)
        bad = [line for line in output.splitlines() if re.search(r"Warning:|warnings\.warn|^W\d{4} ", line)]
        warnings += len(bad)
        results[name] = seconds
        print(f"{name:32s} {seconds:6.3f} s  {len(bad)} warning lines")
    print(f"{'python -c \"import torch\"':32s} {torch_s:6.3f} s")
    values = list(results.values())
    print(f"cli_help_max_s={max(values):.3f} cli_help_median_s={statistics.median(values):.3f} "
          f"torch_import_s={torch_s:.3f} help_over_torch_import={max(values) / torch_s:.2f} warning_lines={warnings}")


if __name__ == "__main__":
    main()
