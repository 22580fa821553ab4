"""Model checkpoints with megatron-core ``dist_checkpointing``, saved atomically.

A checkpoint directory holds the dist_checkpointing files (loadable at any TP/PP) plus
``opdlm_model_config.json``. Saving writes into ``<dir>.partial-<tag>`` and renames it into place
only after every rank has finished, so an interrupted save never leaves a half-written ``<dir>``.
The config saved with the checkpoint pins the padded vocabulary, so the checkpoint reloads at
another tensor-parallel size.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from ..config.model import CONFIG_FILE_NAME, ModelConfig
from ..model.quantization import quantization_exclude_of, quantization_of
from ..runtime.distributed import global_rank
from ..runtime.platform import in_process_checkpoint_writes
from .atomic import atomic_directory_save
from .megatron_lm import is_megatron_lm_root, load_megatron_lm_model

# How megatron lays out optimizer state in a checkpoint (its `metadata` argument, as
# megatron/training/checkpointing.py builds it by default): the distributed optimizer's state is
# saved per data-parallel bucket (reshardable over DP only; megatron's default).
OPTIMIZER_SHARDING_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def is_checkpoint(directory: str) -> bool:
    """A model checkpoint this project reads: its own layout, or a Megatron-LM checkpoint root
    (``checkpoint/megatron_lm.py``) carrying the model config, as OPD ``pretrain()`` runs write."""

    has_config = os.path.isfile(os.path.join(directory, CONFIG_FILE_NAME))
    return has_config and (os.path.isfile(os.path.join(directory, "metadata.json")) or is_megatron_lm_root(directory))


def save_model_checkpoint(model, directory: str, config: ModelConfig, extra_state: Optional[Dict] = None,
                          optimizer=None, write_extra_files: Optional[Callable[[str], None]] = None) -> None:
    """Saves this rank's part of ``model`` (a GPTModel) as a dist checkpoint with its config.

    ``extra_state`` (plain picklable objects, identical on all ranks) goes into the common part;
    ``optimizer`` (a megatron optimizer) adds its sharded state; ``write_extra_files(tmp_dir)`` runs on
    every rank to add files (e.g. per-rank RNG states) before the directory is moved into place.
    """
    from megatron.core import dist_checkpointing, parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pinned = config.replace(padded_vocab=config.padded_vocab_size(tp), quantization=quantization_of(model),
                            quantization_exclude=quantization_exclude_of(model))
    model_state = model.sharded_state_dict()
    sharded = dict(model_state)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_SHARDING_METADATA)
    if extra_state:
        sharded["opdlm_extra_state"] = extra_state

    def write(tmp: str) -> None:
        with in_process_checkpoint_writes():
            dist_checkpointing.save(sharded, tmp)
        if write_extra_files is not None:
            write_extra_files(tmp)
        if global_rank() == 0:
            pinned.save(tmp)

    atomic_directory_save(directory, write)


def load_model_config(directory: str) -> ModelConfig:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    return ModelConfig.load(directory)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error (torch's CheckpointException wraps one per rank)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))
        if isinstance(error, tuple):  # torch keeps (exception, traceback) per rank
            error = error[0]
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return type(error).__name__ + (f": {text[0]}" if text else "")


def load_model_checkpoint(model, directory: str, strict: bool = True, optimizer=None) -> Dict:
    """Loads a dist checkpoint into ``model`` (any TP/PP), and into ``optimizer`` when given; returns
    the checkpoint's extra state. Training checkpoints load as model checkpoints (optimizer state ignored)."""
    from megatron.core import dist_checkpointing


    if not is_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} is not an opdlm-megatron checkpoint (needs metadata.json and {CONFIG_FILE_NAME})"
        )
    if is_megatron_lm_root(directory):
        if optimizer is not None:
            raise ValueError(f"{directory} is a Megatron-LM checkpoint: resume it with Megatron-LM's --load")
        load_megatron_lm_model(model, directory, strict=strict)
        return {}
    _check_quantization(model, directory)
    model_state = model.sharded_state_dict()
    sharded = dict(model_state)
    if optimizer is not None:
        _allocate_distributed_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True,
                                                            metadata=OPTIMIZER_SHARDING_METADATA)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        state = dist_checkpointing.load(sharded, directory)
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - whatever the reader trips on, name the file
        raise ValueError(f"checkpoint {directory} is damaged or does not fit this model: {_root_cause(error)}") from error
    extra = state.pop("opdlm_extra_state", {}) if isinstance(state, dict) else {}
    optimizer_state = state.pop("optimizer", None) if isinstance(state, dict) else None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing={missing} unexpected={unexpected}")
    if optimizer is not None:
        with torch.no_grad():  # fp32 parameters' optimizer shards are views of the (grad-requiring) weights
            optimizer.load_state_dict(optimizer_state)
    return extra


def _check_quantization(model, directory: str) -> None:
    """A checkpoint loads only into a model quantized as it was (an INT8 SmoothQuant checkpoint's weights are
    rescaled: without its smoothing scales they would be silently wrong)."""
    saved = load_model_config(directory).quantization
    if saved != quantization_of(model):
        def name(fmt):
            return f"quantized to {fmt}" if fmt else "not quantized"
        raise ValueError(f"checkpoint {directory} is {name(saved)} and the model it is loaded into is "
                         f"{name(quantization_of(model))}: build the model from the checkpoint's config")


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Without Apex/TE (e.g. on CPU) megatron's DistributedOptimizer cannot describe an optimizer
    state it has not allocated yet (its ``state_dict`` asserts on the missing Adam step), so a fresh
    one is given megatron's own dummy state first; the load that follows overwrites it, and the
    weights, which a zero-gradient step leaves unchanged anyway (without weight decay)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if isinstance(sub, DistributedOptimizer) and inner is not None and len(inner.state) == 0:
            sub._init_optimizer_states_with_dummy_values()


def build_from_checkpoint(directory: str, role: str = "student", **build_kwargs):
    """Builds a model for the current parallel layout from a checkpoint's config and loads its weights."""
    from ..model.build import build_model

    config = load_model_config(directory)
    model = build_model(config, role, **build_kwargs)
    load_model_checkpoint(model, directory)
    return model, config
