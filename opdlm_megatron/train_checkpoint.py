"""Training checkpoints: student weights + optimizer state (dist_checkpointing) + trainer state.

A training checkpoint is a model checkpoint in the sense of ``checkpointing.py`` (the student's
sharded state dict at the top level plus ``opdlm_model_config.json``, so ``build_from_checkpoint``
and the generate CLI load it directly) with three additions:

* ``optimizer``: the megatron optimizer's ``sharded_state_dict`` (Adam moments, fp32 master weights
  where the optimizer keeps them, step counts), resharded by dist_checkpointing like the weights;
* ``opdlm_extra_state`` (common, identical on all ranks): step, data position, scheduler state,
  curriculum length, the run's config;
* ``rng/rank#####.pt``: each rank's Python / NumPy / torch / megatron-tracker RNG states (they differ
  per TP/PP rank). On a resume at a different world size these cannot be matched and are skipped
  with a warning; the trainer's own randomness is derived from ``(seed, step)`` and is unaffected.

The frozen teacher is never part of it. Saves go through ``atomic_directory_save``; the ``latest``
file names the newest complete checkpoint and is rewritten only after the rename.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpointing import global_rank, is_checkpoint, load_model_checkpoint, save_model_checkpoint
from .config import ModelConfig

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
STEP_PREFIX = "step_"


def step_directory(root: str, step: int) -> str:
    return os.path.join(root, f"{STEP_PREFIX}{step:08d}")


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (per the ``latest`` file), or None."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    directory = os.path.join(root, name)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{path} names {name!r}, which is not a complete checkpoint")
    return directory


def capture_rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rng_path(directory: str, rank: int) -> str:
    return os.path.join(directory, "rng", f"rank{rank:05d}.pt")


def save_training_checkpoint(root: str, step: int, model, optimizer, model_config: ModelConfig,
                             trainer_state: Dict[str, Any], keep_last: int = 0) -> str:
    """Saves a resumable checkpoint of ``model`` and ``optimizer`` after ``step`` steps.

    ``model`` is the bare student (not its DDP wrapper, whose keys carry a ``module.`` prefix), so
    the weights' keys are those of a plain model checkpoint.
    """
    directory = step_directory(root, step)
    rng = capture_rng_state()

    def write_rng(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng, _rng_path(tmp, global_rank()))

    os.makedirs(root, exist_ok=True)
    save_model_checkpoint(model, directory, model_config, {"trainer": trainer_state, "world_size": _world()},
                          optimizer=optimizer, write_extra_files=write_rng)
    if global_rank() == 0:
        tmp_latest = os.path.join(root, LATEST_FILE + ".tmp")
        with open(tmp_latest, "w") as f:
            f.write(os.path.basename(directory) + "\n")
        os.replace(tmp_latest, os.path.join(root, LATEST_FILE))
        if keep_last > 0:
            _prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return directory


def _prune(root: str, keep_last: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith(STEP_PREFIX) and "." not in d)
    for name in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_training_checkpoint(directory: str, model, optimizer) -> Dict[str, Any]:
    """Loads weights, optimizer state and this rank's RNG states; returns the trainer state.

    ``model`` is the bare student, as for ``save_training_checkpoint``.
    """
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a complete training checkpoint")
    extra = load_model_checkpoint(model, directory, optimizer=optimizer)
    if "trainer" not in extra:
        raise ValueError(f"{directory} is a model checkpoint without trainer state; it cannot be resumed "
                         "(use it as model.student_checkpoint instead)")
    rng_file = _rng_path(directory, global_rank())
    if extra.get("world_size") == _world() and os.path.isfile(rng_file):
        restore_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("resuming at world size %d from a checkpoint saved at %s: RNG states not restored",
                       _world(), extra.get("world_size"))
    return extra["trainer"]
