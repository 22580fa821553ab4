"""Runtime set-up: torch.distributed, megatron-core parallel_state and RNG, on CUDA/NCCL or CPU/gloo.

``initialize_runtime`` is the one call every entry point makes. With ``device="cpu"`` (or ``"auto"``
on a machine without a GPU) it runs the *same* megatron-core code over gloo. megatron-core assumes
CUDA in a handful of places on the paths we use; ``CpuShims`` redirects exactly those, and only
while it is entered (``Runtime`` enters it and ``Runtime.close`` leaves it):

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``: megatron passes it as ``device=`` to
   buffers (global memory buffer, p2p shape exchange, pipeline receive buffers).
2. ``torch.cuda.synchronize`` -> no-op (p2p communication synchronises after batched isend/irecv).
3. The CUDA RNG: ``torch.cuda.{get,set}_rng_state``/``manual_seed`` and megatron's
   ``tensor_parallel.random._{get,set}_cuda_rng_state`` act on the CPU generator, so megatron's
   RNG tracker forks (tensor-parallel dropout, initialisation) keep their meaning on CPU.
4. ``device="cuda"`` in tensor factories and ``Tensor.cuda()`` / ``Tensor.to("cuda")`` (pipeline
   schedules allocate their token counters this way): a ``TorchFunctionMode`` maps them to CPU.
5. ``torch.cuda.current_stream`` / ``Stream()`` -> a stream whose ``wait_event``/``wait_stream``/
   ``synchronize`` are no-ops, ``torch.cuda.stream(...)`` -> a null context (DDP's ``start_grad_sync``
   waits on the current stream before every grad reduce; the all-to-all MoE token dispatcher, which
   expert parallelism uses, copies its split sizes on a side stream it creates when built).
6. ``Tensor.type()`` (no arguments) reports CPU tensors under their CUDA type names
   (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``): megatron's optimizers and grad clipping
   assert/branch on those names (``optimizer/clip_grads.py`` ``assert param.grad.type() ==
   'torch.cuda.FloatTensor'``, ``distrib_optimizer.py`` / ``optimizer.py`` param-type switches).
7. The all-to-all MoE token dispatcher's ``maybe_move_tensor_to_cpu(t, as_numpy=True)`` returns a
   host array for a CPU tensor too: megatron converts only CUDA tensors (the split sizes it copies to
   the host for ``all_to_all_single``), and torch's collective takes a sequence of ints, not a tensor.

Megatron-LM's ``pretrain()`` (``megatron/training``) assumes more of CUDA; ``MegatronLMCpuShims``
adds what it needs (8-12 in its docstring) around a ``pretrain()`` call on a machine without CUDA
(``megatron_lm/__init__.py``). ``cpu_shim_suspended`` lifts the ``TorchFunctionMode`` of 4 around
hot loops that place nothing (the fused decoding forward).

In CUDA mode nothing is patched. ``tests/test_platform.py`` runs real TP=2 and PP=2
forward/backward passes through ``get_forward_backward_func`` on a machine without CUDA, so a
future megatron-core that adds an uncovered CUDA path fails that test instead of a user's run.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for the torch calls made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.current_stream()`` and for the ``torch.cuda.Stream`` class on CPU, where
    work is synchronous (its events, too, have always happened). A class, not a function: code imported
    while the shims are entered may use ``torch.cuda.Stream`` as a type (``torch.cuda.Stream | None``)."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def __eq__(self, other) -> bool:  # one synchronous stream: every stand-in is the same stream
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0

    def wait_event(self, *_args) -> None:
        pass

    def record_event(self, *_args) -> "_NullStream":
        return self

    def query(self) -> bool:
        return True

    def wait_stream(self, *_args) -> None:
        pass

    def synchronize(self) -> None:
        pass


_NULL_STREAM = _NullStream()


@contextlib.contextmanager
def cpu_shim_suspended():
    """Runs a block without ``_CudaToCpuMode`` seeing its torch calls: for hot loops of plain tensor
    ops on tensors that are already placed (the fused decoding forward), where the mode would only
    add Python overhead to each op. The other shims stay in place."""
    with torch._C.DisableTorchFunction():
        yield


_ACTIVE_SHIMS = 0  # how many CpuShims are entered (CUDA calls are redirected to the CPU meanwhile)


def compute_device() -> torch.device:
    """The device models go to: CPU while the CPU shims redirect CUDA (where ``torch.cuda`` may claim
    to be available), else the current CUDA device when there is one, else CPU."""
    if _ACTIVE_SHIMS or not torch.cuda.is_available():
        return _CPU
    return torch.device("cuda", torch.cuda.current_device())


class _ScopedPatches:
    """Attributes replaced while the context is entered and restored, in reverse order, on exit."""

    def __init__(self) -> None:
        self._stack: Optional[contextlib.ExitStack] = None

    @property
    def active(self) -> bool:
        return self._stack is not None

    @staticmethod
    def _patcher(stack: contextlib.ExitStack) -> Callable[[Any, str, Any], None]:
        def patch(owner: Any, name: str, value: Any) -> None:
            if not hasattr(owner, name):  # an attribute this torch/megatron does not have: nothing to redirect
                return
            original = getattr(owner, name)
            setattr(owner, name, value)
            stack.callback(setattr, owner, name, original)

        return patch

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


class CpuShims(_ScopedPatches):
    """Context manager that lets megatron-core's CUDA-assuming code paths run on CPU.

    Re-entrant use is not supported; ``Runtime`` owns a single instance.
    """

    def __enter__(self) -> "CpuShims":
        if self._stack is not None:
            raise RuntimeError("CpuShims is already active")
        from megatron.core.tensor_parallel import random as mcore_random
        from megatron.core.transformer.moe import token_dispatcher

        stack = contextlib.ExitStack()
        patch = self._patcher(stack)

        def get_rng_state(*_args, **_kwargs):
            return torch.get_rng_state()

        def set_rng_state(state, *_args, **_kwargs):
            torch.set_rng_state(state)

        patch(torch.cuda, "current_device", lambda: _CPU)
        patch(torch.cuda, "current_stream", lambda *a, **k: _NULL_STREAM)
        patch(torch.cuda, "Stream", _NullStream)
        patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
        patch(torch.cuda, "synchronize", lambda *a, **k: None)
        patch(torch.cuda, "get_rng_state", get_rng_state)
        patch(torch.cuda, "set_rng_state", set_rng_state)
        patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
        patch(torch.cuda.random, "get_rng_state", get_rng_state)
        patch(mcore_random, "_get_cuda_rng_state", get_rng_state)
        patch(mcore_random, "_set_cuda_rng_state", set_rng_state)
        host_copy = token_dispatcher.maybe_move_tensor_to_cpu

        def host_split_sizes(tensor, as_numpy=False, record_stream=False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return host_copy(tensor, as_numpy=as_numpy, record_stream=record_stream)

        patch(token_dispatcher, "maybe_move_tensor_to_cpu", host_split_sizes)
        stack.enter_context(_CudaToCpuMode())
        global _ACTIVE_SHIMS
        _ACTIVE_SHIMS += 1

        def leave() -> None:
            global _ACTIVE_SHIMS
            _ACTIVE_SHIMS -= 1

        stack.callback(leave)
        self._stack = stack
        return self

class MegatronLMCpuShims(_ScopedPatches):
    """What Megatron-LM's ``pretrain()`` (``megatron/training``) needs on top of ``CpuShims`` to run on
    CPU over gloo, entered only around a ``pretrain()`` call on a machine without CUDA:

    8. ``torch.cuda.is_available`` -> True and ``device_count`` -> 1: ``initialize_megatron`` asserts
       the first (``pretrain`` has no ``allow_no_cuda``) and only builds the model-parallel groups and
       seeds megatron's RNG tracker when the second is positive; every placement they imply is
       redirected by 1-6. ``torch.accelerator.current_accelerator`` -> None keeps torch's own
       checks (the optimizers' graph-capture check) from initialising CUDA.
    9. ``torch.cuda.set_device`` / ``set_stream`` / ``empty_cache`` and the memory
       statistics ``training_log`` / ``report_memory`` read -> no-ops, zeros; the device properties
       -> a "cpu" device of compute capability 0.0 (``validate_args`` reads it for TP > 1, and then
       wants ``CUDA_DEVICE_MAX_CONNECTIONS=1``, which is set while the shims are entered).
    10. ``torch._dynamo.config.disable`` -> True: megatron's ``torch.compile``'d fusions (the MoE router's)
        would trace against the CUDA that 8 claims; they are GPU speed-ups and run eagerly instead.
    11. ``megatron.core.datasets.utils.compile_helpers`` -> no-op: it runs ``make`` on a Makefile the
       wheel does not ship; the prebuilt ``helpers_cpp`` it would build is in the wheel.
    12. ``megatron.training.training.set_jit_fusion_options`` -> no-op: its warm-up runs the fused
        bias-GeLU/SwiGLU kernels on ``device="cuda"`` tensors, which OPD does not use.
    """

    def __init__(self) -> None:
        super().__init__()
        self._base = CpuShims()

    def __enter__(self) -> "MegatronLMCpuShims":
        import megatron.core.datasets.utils as dataset_utils
        import megatron.training.training as mlm_training

        stack = contextlib.ExitStack()
        patch = self._patcher(stack)

        zero = lambda *a, **k: 0  # noqa: E731
        patch(torch.cuda, "is_available", lambda: True)
        patch(torch.cuda, "device_count", lambda: 1)
        # torch's own code asks the accelerator API, which would then try to initialise CUDA
        patch(torch.accelerator, "current_accelerator", lambda *a, **k: None)
        patch(torch.cuda, "set_device", lambda *a, **k: None)
        patch(torch.cuda, "set_stream", lambda *a, **k: None)
        # megatron's torch.compile'd fusions (the MoE router's) would trace on a CUDA that claims to exist;
        # they are GPU speed-ups, so they run eagerly here
        patch(torch._dynamo.config, "disable", True)
        patch(torch.cuda, "empty_cache", lambda: None)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            patch(torch.cuda, name, zero)
        patch(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
        patch(torch.cuda, "memory_stats", lambda *a, **k: {})
        patch(torch.cuda, "mem_get_info", lambda *a, **k: (0, 0))
        properties = SimpleNamespace(major=0, minor=0, name="cpu", total_memory=0, multi_processor_count=1)
        patch(torch.cuda, "get_device_properties", lambda *a, **k: properties)
        patch(torch.cuda, "get_device_capability", lambda *a, **k: (0, 0))
        patch(torch.cuda, "get_device_name", lambda *a, **k: "cpu")
        # validate_args demands it for TP > 1 before Blackwell (device "arch" 0 here); no effect on CPU
        previous = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        stack.callback(lambda: os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS") if previous is None
                       else os.environ.__setitem__("CUDA_DEVICE_MAX_CONNECTIONS", previous))
        patch(dataset_utils, "compile_helpers", lambda: None)
        patch(mlm_training, "set_jit_fusion_options", lambda *a, **k: None)
        if not self._base.active:
            stack.enter_context(self._base)
        self._stack = stack
        return self


@contextlib.contextmanager
def in_process_checkpoint_writes():
    """Synchronous dist-checkpoint saves inside the block collect their write results in a thread
    queue. megatron-core runs a synchronous save as an asynchronous request executed in place
    (``TorchDistSaveShardedStrategy.save``), whose writer reports through
    ``filesystem_async.get_write_results_queue()``: on first use in a process that is a
    ``multiprocessing.Manager().Queue()``, i.e. a server process started with ``spawn`` (a fresh
    interpreter that imports the caller's main module: measured 8 s per process here, paid by every
    rank of every run that saves). Everything of an in-place save stays in this process, so a
    ``queue.Queue`` does the same job. The module's queue is restored on exit, so a genuinely
    asynchronous save (Megatron-LM's ``--async-save``) still gets its process-safe queue; one that
    already exists is left in place."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:  # one exists (or no such hook)
        yield
        return
    import queue

    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


@dataclass(frozen=True)
class ParallelSizes:
    """Parallel layout of a run; data parallel is whatever the world size leaves. Experts (MoE) are
    split over ``expert_model_parallel_size`` ranks, each expert tensor-parallel like the dense layers
    (megatron's default expert tensor parallel size: TP), so TP x EP x PP must divide the world too."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1

    def validate(self, world_size: int) -> int:
        """Checks the sizes against ``world_size`` and returns the data-parallel size."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        model_parallel = (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )
        if world_size % model_parallel != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by TP({self.tensor_model_parallel_size}) x "
                f"PP({self.pipeline_model_parallel_size}) x CP({self.context_parallel_size}) = {model_parallel}"
            )
        expert_parallel = (
            self.tensor_model_parallel_size * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        )
        if world_size % expert_parallel != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by TP({self.tensor_model_parallel_size}) x "
                f"EP({self.expert_model_parallel_size}) x PP({self.pipeline_model_parallel_size}) = {expert_parallel}"
                f" (the experts' layout); launch a multiple of {expert_parallel} ranks"
            )
        return world_size // model_parallel


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu-[001-004,010],login1`` -> ``gpu-001``), without
    calling ``scontrol`` (not every container has it)."""
    text = nodelist.strip()
    depth, cut = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            cut = i
            break
    first = text[:cut]
    if "[" not in first:
        if not first:
            raise ValueError(f"empty SLURM node list {nodelist!r}")
        return first
    prefix, rest = first.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def launch_environment(env: Optional[dict] = None) -> dict:
    """torch.distributed's ``env://`` variables for this process: torchrun's when set, else derived
    from SLURM's (one ``srun`` task per GPU: ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``,
    the first host of ``SLURM_JOB_NODELIST`` as the rendezvous host, ``MASTER_PORT`` or a port from the
    job id), else {} (a single process). Returns only the variables to add."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and "MASTER_ADDR" not in env:
        raise ValueError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor MASTER_ADDR names the rendezvous host")
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
    }


def resolve_device(device: str) -> torch.device:
    """Maps ``"auto" | "cuda" | "cpu"`` to a torch device (auto: CUDA when available)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return _CPU


class Runtime:
    """Handle on an initialised run. ``close()`` (or leaving the ``with`` block) undoes everything
    ``initialize_runtime`` did: parallel state, the process group it created, and the CPU shims."""

    def __init__(self, device: torch.device, sizes: ParallelSizes, created_process_group: bool, shims) -> None:
        self.device = device
        self.sizes = sizes
        self._created_process_group = created_process_group
        self._shims: Optional[CpuShims] = shims
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.data_parallel_size = sizes.validate(self.world_size)

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def close(self) -> None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if self._created_process_group and dist.is_initialized():
            dist.destroy_process_group()
        if self._shims is not None:
            self._shims.__exit__(None, None, None)
            self._shims = None
        release_unreachable_process_groups()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy, torch and megatron's model-parallel RNG tracker (per TP/PP rank)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def release_unreachable_process_groups() -> None:
    """Collects the reference cycles of a finished run (model, DDP buckets, optimizer, megatron's
    group caches) now rather than at some later garbage collection: each keeps its process groups,
    and a gloo group keeps its own network threads alive. Without it, runs started one after another
    in one process (the study's arms, the Python API, tests) pile up ~50 idle-polling threads per run."""
    gc.collect()


def initialize_runtime(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    device: str = "auto",
    seed: int = 1234,
    timeout_minutes: int = 30,
    expert_model_parallel_size: int = 1,
) -> Runtime:
    """Initialises torch.distributed (if needed), megatron parallel_state and RNG trackers.

    Works single-process (a one-rank group is created in memory), under ``torchrun`` (``env://``)
    and with one ``srun`` task per GPU (SLURM's variables, ``launch_environment``). ``device``: ``"auto"`` picks CUDA+NCCL when available, else CPU+gloo.
    """
    from megatron.core import parallel_state

    release_unreachable_process_groups()  # an earlier run's groups whose last reference is gone by now
    if not dist.is_initialized():
        os.environ.update(launch_environment())  # srun-launched tasks: SLURM's variables -> env://
    torch_device = resolve_device(device)
    sizes = ParallelSizes(tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
                          expert_model_parallel_size)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"

    created = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        created = True
    elif dist.get_backend() != backend:
        raise RuntimeError(
            f"torch.distributed is already initialised with backend {dist.get_backend()!r}, "
            f"but device {torch_device.type!r} needs {backend!r}"
        )
    try:
        sizes.validate(dist.get_world_size())
    except ValueError:
        if created:
            dist.destroy_process_group()
        raise
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)

    shims = CpuShims().__enter__() if torch_device.type == "cpu" else None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    runtime = Runtime(torch_device, sizes, created, shims)
    logger.info(
        "runtime: device=%s backend=%s world=%d TP=%d PP=%d CP=%d EP=%d DP=%d",
        torch_device, backend, runtime.world_size, sizes.tensor_model_parallel_size,
        sizes.pipeline_model_parallel_size, sizes.context_parallel_size, sizes.expert_model_parallel_size,
        runtime.data_parallel_size,
    )
    return runtime
