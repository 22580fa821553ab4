"""A scheduler's SIGTERM (or SIGUSR1) during `opdlm-train`: the step finishes, a checkpoint is saved,
the process exits 0, and the run resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from opdlm_megatron.checkpoint.training import latest_checkpoint
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.conftest import REPO_ROOT
from tests.distributed.train_common import tiny_train_dict, write_token_prompts
from tests.helpers import save_trainer_student


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_and_exits_zero(tmp_path, sig):
    ckpt = save_trainer_student(tmp_path / "ckpt")
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=6)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "opdlm_megatron.train", "--config", str(REPO_ROOT / "configs" / "tiny_cpu.yaml"),
           f"model.student_checkpoint={ckpt}", f"data.path={data}", f"run_dir={run}", "train.steps=200",
           "checkpoint.save_every=0", "logging.progress_bar=false"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert f"on {sig}: checkpoint saved" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = latest_checkpoint(str(run / "checkpoints"))
    assert saved is not None and saved.endswith(f"step_{len(steps):08d}"), (saved, steps)
    assert len(steps) < 200


def test_bad_signal_name_is_refused(tmp_path):
    data = tiny_train_dict(str(tmp_path), "p.jsonl", "ckpt")
    data["checkpoint"]["exit_signals"] = ["SIGKILL"]
    with pytest.raises(ValueError, match=r"checkpoint.exit_signals has \['SIGKILL'\]; allowed"):
        train_config_from_dict(data)


@pytest.mark.distributed
def test_sigterm_to_a_torchrun_job(tmp_path):
    """SIGTERM to torchrun (2 data-parallel ranks): torchrun passes it on to its workers, which finish
    the step, save one checkpoint together and exit 0; the run then resumes from that checkpoint to
    its end, each step logged once."""
    ckpt = save_trainer_student(tmp_path / "ckpt")
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=6)
    run = tmp_path / "run"
    train = ["-m", "opdlm_megatron.train", "--config", str(REPO_ROOT / "configs" / "tiny_cpu.yaml"),
             f"model.student_checkpoint={ckpt}", f"data.path={data}", f"run_dir={run}", "checkpoint.save_every=0",
             "logging.progress_bar=false", "train.global_batch_size=2", "rollout.tasks_per_rollout=2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(launcher + train + ["train.steps=200"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert out.count("on SIGTERM: checkpoint saved") == 1, out[-3000:]  # said once, by rank 0
    # torchrun itself ends with its SignalException (its way of saying it was signalled); the
    # workers neither fail nor are killed after its grace period
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-3000:]
    assert "SIGKILL" not in out, out[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = latest_checkpoint(str(run / "checkpoints"))
    assert saved is not None and saved.endswith(f"step_{len(steps):08d}"), (saved, steps)
    stop = len(steps) + 2
    resumed = subprocess.run(launcher + train + [f"train.steps={stop}"], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(stop))
