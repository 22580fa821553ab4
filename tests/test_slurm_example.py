"""examples/slurm/opd.sbatch end to end on CPU: HF conversion, the planner, OPD with one torchrun per
node (one node of 2 ranks here, TP=2, c10d rendezvous) and the HF export, with stand-ins for SLURM's
``srun`` (runs its command here, once) and ``scontrol`` (the node list is this host)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from opdlm_megatron.training.metrics import read_metrics
from tests.conftest import REPO_ROOT
from tests.distributed.convert_common import make_tiny_hf
from tests.distributed.train_common import write_token_prompts

SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own --options, run the command once on this host
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.distributed
def test_sbatch_converts_plans_trains_and_exports(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", SRUN)
    _executable(bin_dir / "scontrol", SCONTROL)
    hf_dir, run = tmp_path / "hf_start", tmp_path / "run"
    start = make_tiny_hf("llama_mha_tied", str(hf_dir))
    prompts = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=4)
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
               PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="2",
               MASTER_PORT=str(_free_port()), TP="2", PP="1", DTYPE="float32", TRANSFORMER_IMPL="local",
               CONFIG=str(REPO_ROOT / "configs" / "tiny_cpu.yaml"))
    proc = subprocess.run(["bash", str(REPO_ROOT / "examples" / "slurm" / "opd.sbatch"), str(hf_dir), str(run),
                           f"data.path={prompts}", "train.steps=2", "logging.tensorboard=true",
                           "logging.progress_bar=false"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fits" in proc.stdout.splitlines()  # the planner's verdict for 1 node x 2 ranks at TP 2
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [0, 1]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    # the export is the trained student: same architecture as the start, different weights
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(run / "hf"))
    before, after = start.state_dict(), trained.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert after[name].shape == before[name].shape
    assert not torch.equal(after[name], before[name])
