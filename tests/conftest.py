"""Shared fixtures: a single-process CPU runtime and a torchrun launcher for 2-rank gloo tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runtime():
    """TP=1, PP=1 megatron runtime on CPU/gloo for the duration of one test."""
    from opdlm_megatron.runtime.platform import initialize_runtime

    rt = initialize_runtime(device="cpu", seed=1234)
    try:
        yield rt
    finally:
        rt.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 900) -> str:
    """Runs ``tests/distributed/<script>`` under torchrun (CPU, gloo) and returns its stdout.

    Fails the test with the ranks' output when any rank fails.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(REPO_ROOT / "tests" / "distributed" / script), *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} {' '.join(args)} failed ({proc.returncode}):\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc.stdout


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _console_handlers_removed():
    """A command's ``main()`` run in-process installs the console handlers of ``cli.setup_console``
    (bound to that test's captured stderr); later tests start without them."""
    yield
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_opdlm", None):
            root.removeHandler(handler)
            handler.close()
