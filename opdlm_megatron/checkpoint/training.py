"""Training checkpoints: student weights + optimizer state (dist_checkpointing) + trainer state.

A training checkpoint is a model checkpoint in the sense of ``checkpointing.py`` (the student's
sharded state dict at the top level plus ``opdlm_model_config.json``, so ``build_from_checkpoint``
and the generate CLI load it directly) with three additions:

* ``optimizer``: the megatron optimizer's ``sharded_state_dict`` (Adam moments, fp32 master weights
  where the optimizer keeps them, step counts), resharded by dist_checkpointing like the weights;
* ``opdlm_extra_state`` (common, identical on all ranks): step, data position, scheduler state,
  curriculum length, the run's config;
* ``rng/rank#####.pt``: each rank's Python / NumPy / torch / megatron-tracker RNG states (they differ
  per TP/PP rank), as tensors and plain containers, loaded with ``weights_only=True`` (no pickle).
  On a resume at a different world size these cannot be matched and are skipped with a warning;
  the trainer's own randomness is derived from ``(seed, rollout, step)`` and is unaffected;
* ``rollout_buffer.safetensors`` (only when saved inside a rollout, i.e. between two optimizer steps
  fed by the same rollout): the rollout's answers and commit rounds, so the remaining steps train on
  exactly the trajectories an uninterrupted run would.

The frozen teacher is never part of it. Saves go through ``atomic_directory_save``; the ``latest``
file names the newest complete checkpoint and is rewritten only after the rename.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..config.model import CONFIG_FILE_NAME, ModelConfig
from ..rollout.types import RolloutResult
from ..runtime.distributed import global_rank
from .model import is_checkpoint, load_model_checkpoint, save_model_checkpoint
from .tokenizer import copy_tokenizer_files

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
STEP_PREFIX = "step_"
ROLLOUT_BUFFER_FILE = "rollout_buffer.safetensors"


MANIFEST_FILE = "manifest.json"


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str, step: int, config_hash: str, objective: Optional[str] = None) -> None:
    """Writes ``manifest.json`` (step, config hash, the objective trained, every file with its size and
    SHA-256) last into a complete checkpoint directory, atomically. A directory without it is not a
    finished save."""
    files = {}
    for base, _dirs, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(base, name)
            rel = os.path.relpath(path, directory)
            if rel in (MANIFEST_FILE, MANIFEST_FILE + ".tmp"):
                continue
            files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    tmp = os.path.join(directory, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "config_hash": config_hash, "objective": objective, "files": files}, f, indent=1,
                  sort_keys=True)
    os.replace(tmp, os.path.join(directory, MANIFEST_FILE))


def manifest_problem(directory: str, checksums: bool = True) -> Optional[str]:
    """Why ``directory`` is not a complete, undamaged checkpoint (None when it is). Without a manifest
    the older rule applies (``is_checkpoint``): a step directory only appears by an atomic rename once
    every file is written, so one saved before manifests existed, or killed between the rename and the
    manifest, is complete; the manifest adds the check for damage done afterwards."""
    if not is_checkpoint(directory):
        return "not a complete checkpoint (metadata or model config missing)"
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({error})"
    for rel, entry in files.items():
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != entry["size"]:
            return f"{rel} has {os.path.getsize(file)} bytes, the manifest says {entry['size']}"
        if checksums and _sha256(file) != entry["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def trained_objective(directory: str) -> Optional[str]:
    """The objective a training checkpoint was trained with (its manifest), None for any other."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("objective")
    except (OSError, ValueError, AttributeError):
        return None


# objectives whose checkpoints are still autoregressive models (a teacher may come from them)
AUTOREGRESSIVE_OBJECTIVES = ("ar",)


def check_teacher_checkpoint(directory: str, setting: str, hint: str = "") -> None:
    """Raises a ValueError when ``directory`` (named by config ``setting``) is a block-diffusion
    student: the teacher must be the AR model (a converted checkpoint or one trained with ``ar``), or a
    quantized checkpoint (the teacher stays in its training precision)."""
    config_file = os.path.join(directory, CONFIG_FILE_NAME)
    quantization = ModelConfig.load(directory).quantization if os.path.isfile(config_file) else None
    if quantization is not None:
        raise ValueError(f"{setting} {directory} is quantized ({quantization}, ModelOpt); the teacher is the frozen "
                         f"model in its training precision: give the unquantized checkpoint"
                         + (f" - {hint}" if hint else ""))
    objective = trained_objective(directory)
    if objective is not None and objective not in AUTOREGRESSIVE_OBJECTIVES:
        raise ValueError(
            f"{setting} {directory} is a block-diffusion student (trained with objective {objective!r}); the "
            f"teacher must be an autoregressive model: a converted checkpoint or one trained with objective 'ar'"
            + (f" - {hint}" if hint else "")
        )


def step_directory(root: str, step: int) -> str:
    return os.path.join(root, f"{STEP_PREFIX}{step:08d}")


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest checkpoint under ``root`` whose manifest verifies: the one the ``latest`` file names,
    else (saying which were skipped and why) the newest ``step_*`` directory that verifies; None when
    there is none."""
    if not os.path.isdir(root):
        return None
    candidates = sorted((d for d in os.listdir(root) if d.startswith(STEP_PREFIX) and "." not in d), reverse=True)
    path = os.path.join(root, LATEST_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            named = f.read().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for name in candidates:
        directory = os.path.join(root, name)
        problem = manifest_problem(directory)
        if problem is None:
            return directory
        logger.warning("skipping checkpoint %s: %s", directory, problem)
    return None


def capture_rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _as_tuples(value):
    """``random.setstate`` wants tuples where a round trip may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rng_path(directory: str, rank: int) -> str:
    return os.path.join(directory, "rng", f"rank{rank:05d}.pt")


def save_training_checkpoint(root: str, step: int, model, optimizer, model_config: ModelConfig,
                             trainer_state: Dict[str, Any], keep_last: int = 0,
                             rollout_buffer: Optional[RolloutResult] = None,
                             tokenizer_dir: Optional[str] = None, run_config: Optional[Dict[str, Any]] = None) -> str:
    """Saves a resumable checkpoint of ``model`` and ``optimizer`` after ``step`` steps.

    ``model`` is the bare student (not its DDP wrapper, whose keys carry a ``module.`` prefix), so
    the weights' keys are those of a plain model checkpoint. ``rollout_buffer`` (identical on every
    rank) is written once, by rank 0; so are the tokenizer files of ``tokenizer_dir`` (into
    ``tokenizer/``, so ``generate``, ``opdlm-eval`` and the HF export work on the checkpoint as they
    do on a converted one). ``run_config`` (the run's ``TrainConfig`` as a dict) goes into
    ``run_config.json``, so a resume can say what changed (``resume_config_changes``).
    """
    from safetensors.torch import save_file

    directory = step_directory(root, step)
    rng = capture_rng_state()

    def write_rng(tmp: str) -> None:
        _fault_drill_pause()
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng, _rng_path(tmp, global_rank()))
        if rollout_buffer is not None and global_rank() == 0:
            save_file(rollout_buffer.tensors(), os.path.join(tmp, ROLLOUT_BUFFER_FILE))
        if tokenizer_dir and os.path.isdir(tokenizer_dir) and global_rank() == 0:
            copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        if run_config is not None and global_rank() == 0:
            with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
                json.dump(run_config, f, indent=1, sort_keys=True, default=str)

    os.makedirs(root, exist_ok=True)
    save_model_checkpoint(model, directory, model_config, {"trainer": trainer_state, "world_size": _world()},
                          optimizer=optimizer, write_extra_files=write_rng)
    if global_rank() == 0:
        config_hash = _config_hash(trainer_state)
        write_manifest(directory, step, config_hash, trainer_state.get("objective"))
        tmp_latest = os.path.join(root, LATEST_FILE + ".tmp")
        with open(tmp_latest, "w") as f:
            f.write(os.path.basename(directory) + "\n")
        os.replace(tmp_latest, os.path.join(root, LATEST_FILE))
        if keep_last > 0:
            _prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return directory


RUN_CONFIG_FILE = "run_config.json"
# keys a resumed run may change without comment: where and how often it saves and logs, how long it runs,
# its parallel layout (checkpoints reshard), what it does on NaN
RESUME_FREE_KEYS = ("checkpoint.", "logging.", "train.steps", "parallel.", "nan_policy", "run_dir")
# keys the saved optimizer state is keyed by (megatron's parameter groups carry max_lr and min_lr)
RESUME_FIXED_KEYS = ("optim.lr", "optim.min_lr")


def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config_changes(directory: str, run_config: Dict[str, Any]) -> List[str]:
    """What this run's config changes against the one ``directory`` was saved with (``key old -> new``;
    empty for checkpoints without ``run_config.json``). Raises ValueError for a change the saved
    optimizer state cannot follow, saying what to do."""
    path = os.path.join(directory, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        saved = _flatten(json.load(f))
    now = _flatten(json.loads(json.dumps(run_config, default=str)))
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
               and not any(k == free or (free.endswith(".") and k.startswith(free)) for free in RESUME_FREE_KEYS)]
    fixed = [k for k in changed if k in RESUME_FIXED_KEYS]
    if fixed:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in fixed)
        raise ValueError(f"{directory} was saved with {was}; this run has "
                         f"{', '.join(f'{k}={now.get(k)!r}' for k in fixed)}: the saved optimizer state is keyed by "
                         f"the learning rates, so resume with the saved values, or start a new run (another run_dir, "
                         f"or checkpoint.resume=false)")
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed]


FAULT_DRILL_SAVE_DELAY = "OPDLM_FAULT_DRILL_SAVE_DELAY"


def _fault_drill_pause() -> None:
    """benchmarks/fault_drill.py only: hold every save half-written for this many seconds, so that the
    drill can kill a run inside a save. Unset in any real run."""
    delay = os.environ.get(FAULT_DRILL_SAVE_DELAY)
    if delay:
        import time

        time.sleep(float(delay))


def remove_stale_partials(root: str) -> int:
    """Deletes what interrupted saves left under ``root`` (``*.partial-*`` temporary directories and
    ``*.old-*`` replaced ones; never a complete checkpoint); rank 0 only. Returns how many."""
    if global_rank() != 0 or not os.path.isdir(root):
        return 0
    stale = [d for d in os.listdir(root) if d.startswith(STEP_PREFIX) and (".partial-" in d or ".old-" in d)]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if stale:
        logger.info("removed %d half-written checkpoint directories left by an interrupted save", len(stale))
    return len(stale)


def _config_hash(trainer_state: Dict[str, Any]) -> str:
    import hashlib

    keys = {k: trainer_state.get(k) for k in ("objective", "seed")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prune(root: str, keep_last: int) -> None:
    """Keeps the ``keep_last`` newest checkpoints, and never deletes the newest one that verifies."""
    steps = sorted(d for d in os.listdir(root) if d.startswith(STEP_PREFIX) and "." not in d)
    newest_valid = next((d for d in reversed(steps) if manifest_problem(os.path.join(root, d), checksums=False) is None),
                        None)
    for name in steps[:-keep_last]:
        if name != newest_valid:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_training_checkpoint(directory: str, model, optimizer,
                             verified: bool = False) -> Tuple[Dict[str, Any], Optional[RolloutResult]]:
    """Loads weights, optimizer state and this rank's RNG states; returns the trainer state and the
    saved rollout buffer (None when the checkpoint was taken between rollouts).

    ``model`` is the bare student, as for ``save_training_checkpoint``. ``verified``: the caller has
    just checked the manifest (``latest_checkpoint``), so the files are not hashed a second time.
    """
    from safetensors.torch import load_file

    problem = None if verified else manifest_problem(directory)
    if problem is not None:
        raise ValueError(f"checkpoint {directory} is damaged or incomplete: {problem}")
    extra = load_model_checkpoint(model, directory, optimizer=optimizer)
    if "trainer" not in extra:
        raise ValueError(f"{directory} is a model checkpoint without trainer state; it cannot be resumed "
                         "(use it as model.student_checkpoint instead)")
    rng_file = _rng_path(directory, global_rank())
    if extra.get("world_size") == _world() and os.path.isfile(rng_file):
        try:
            state = torch.load(rng_file, weights_only=True)
        except Exception as error:  # a pickle payload or a damaged file
            raise ValueError(f"{rng_file} is not a plain RNG state file (refused to unpickle it): {error}") from None
        restore_rng_state(state)
    else:
        logger.warning("resuming at world size %d from a checkpoint saved at %s: RNG states not restored",
                       _world(), extra.get("world_size"))
    buffer_file = os.path.join(directory, ROLLOUT_BUFFER_FILE)
    buffer = RolloutResult.from_tensors(load_file(buffer_file)) if os.path.isfile(buffer_file) else None
    return extra["trainer"], buffer
