"""The CPU platform layer: scoped shims, device resolution, clear errors.

The coverage check of the shims is tests/test_model_parallel.py: it runs real TP=2 and PP=2
forward/backward passes through megatron's get_forward_backward_func on a machine without CUDA, so
any CUDA path a future megatron-core adds that the shims do not cover fails there.
"""

import pytest
import torch

from opdlm_megatron.runtime.platform import CpuShims, ParallelSizes, initialize_runtime, resolve_device


def test_shims_are_scoped():
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron.core.transformer.moe import token_dispatcher

    originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
                 mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state, torch.cuda.Stream,
                 torch.cuda.stream, token_dispatcher.maybe_move_tensor_to_cpu)
    with CpuShims():
        # the all-to-all MoE dispatcher's side stream and host split sizes; Stream stays a type (code imported
        # meanwhile annotates with `torch.cuda.Stream | None`)
        side = torch.cuda.Stream()
        assert side == torch.cuda.current_stream() and (torch.cuda.Stream | None) is not None
        with torch.cuda.stream(side):
            side.record_event().synchronize()
        assert token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True).tolist() == [1, 2]
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert torch.ones(1).to("cuda").device.type == "cpu"
        torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(None)
        # megatron's optimizer / grad clipping check CUDA type names
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
    assert torch.ones(1).type() == "torch.FloatTensor"
    after = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
             mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state, torch.cuda.Stream,
             torch.cuda.stream, token_dispatcher.maybe_move_tensor_to_cpu)
    assert after == originals
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_runtime_close_restores_and_destroys():
    from megatron.core import parallel_state

    original = torch.cuda.current_device
    with initialize_runtime(device="cpu") as rt:
        assert rt.is_cpu and rt.world_size == 1 and rt.data_parallel_size == 1
        assert parallel_state.model_parallel_is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    assert not torch.distributed.is_initialized()
    assert torch.cuda.current_device is original


def test_megatron_rng_tracker_forks_cpu_generator(runtime):
    """The model-parallel RNG tracker keeps its meaning on CPU: a fork draws from its own stream."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced


def test_resolve_device_errors():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


def test_bad_parallel_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        ParallelSizes(tensor_model_parallel_size=2).validate(world_size=3)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelSizes(pipeline_model_parallel_size=0).validate(world_size=1)
    with pytest.raises(ValueError, match="world size 1"):
        initialize_runtime(tensor_model_parallel_size=2, device="cpu")
    assert not torch.distributed.is_initialized()  # nothing left behind


@pytest.mark.parametrize("nodelist,first", [
    ("node07", "node07"), ("gpu-[001-004,010],login1", "gpu-001"), ("a[3,5-6]", "a3"),
    ("rack1-[12-13]-ib", "rack1-12-ib"), ("x1,x2", "x1"),
])
def test_first_slurm_host(nodelist, first):
    from opdlm_megatron.runtime.platform import first_slurm_host

    assert first_slurm_host(nodelist) == first


def test_launch_environment_from_slurm_variables():
    from opdlm_megatron.runtime.platform import launch_environment

    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "h100-[017-018]"}
    assert launch_environment(slurm) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                         "MASTER_ADDR": "h100-017", "MASTER_PORT": str(20000 + 123456 % 20000)}
    # torchrun's variables win; explicit MASTER_* win; nothing set -> single process
    assert launch_environment({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == {}
    assert launch_environment({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"})["MASTER_ADDR"] == "10.0.0.1"
    assert launch_environment({}) == {}
    with pytest.raises(ValueError, match="rendezvous host"):
        launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.mark.distributed
def test_two_tasks_started_with_slurm_variables_only(tmp_path):
    """Two processes launched as srun would (no torchrun, no RANK/WORLD_SIZE) form the TP=2 job."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    procs = []
    for rank in range(2):
        env = dict(base, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "distributed" / "slurm_task.py"),
                                       "--out", str(tmp_path / "view")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    views = [json.loads((tmp_path / f"view.{r}").read_text()) for r in range(2)]
    assert [v["rank"] for v in views] == [0, 1] and {v["world"] for v in views} == {2}
    assert [v["local_rank"] for v in views] == [0, 1] and {v["master"] for v in views} == {"127.0.0.1"}
    assert views[0]["logits_sum"] == views[1]["logits_sum"]


def test_checkpoint_saves_write_in_process(tmp_path):
    """A synchronous dist-checkpoint save starts no process (megatron would start a spawn-mode
    multiprocessing Manager for its write-results queue, ~8 s in every process that saves), writes a
    checkpoint that loads back bit for bit, and leaves megatron's queue hook as it found it."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from opdlm_megatron.checkpoint.model import build_from_checkpoint, save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from tests.helpers import tiny_config

    before = filesystem_async._results_queue
    children = set(multiprocessing.active_children())
    with initialize_runtime(device="cpu", seed=2):
        config = tiny_config()
        model = build_model(config, "student")
        save_model_checkpoint(model, str(tmp_path / "ckpt"), config)
        assert set(multiprocessing.active_children()) == children
        assert filesystem_async._results_queue is before
        loaded, _ = build_from_checkpoint(str(tmp_path / "ckpt"), "student")
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
