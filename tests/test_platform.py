"""The CPU platform layer: scoped shims, device resolution, clear errors.

The coverage check of the shims is tests/test_model_parallel.py: it runs real TP=2 and PP=2
forward/backward passes through megatron's get_forward_backward_func on a machine without CUDA, so
any CUDA path a future megatron-core adds that the shims do not cover fails there.
"""

import pytest
import torch

from opdlm_megatron import platform
from opdlm_megatron.platform import CpuShims, ParallelSizes, initialize_runtime, resolve_device


def test_shims_are_scoped():
    from megatron.core.tensor_parallel import random as mcore_random

    originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
                 mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)
    with CpuShims():
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
             mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)
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
