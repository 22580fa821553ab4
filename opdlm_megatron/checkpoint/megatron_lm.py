"""Megatron-LM's checkpoint layout, read and written with the same dist_checkpointing files.

Megatron-LM (``--ckpt-format torch_dist``) keeps ``<root>/latest_checkpointed_iteration.txt`` (an
iteration number, or ``release`` for converted weights) and one directory per save,
``<root>/iter_0000100/`` or ``<root>/release/``, holding a dist checkpoint whose model tensors sit
under the ``"model"`` key of the saved state dict. ShardedTensor keys are the same strings in both
layouts (``decoder.layers.self_attention.linear_qkv.weight`` ...), so conversion is a re-save, no
renaming; either layout loads at any TP/PP. This project's checkpoints keep the model's tensors at
the top level of a single directory next to ``opdlm_model_config.json``; a Megatron-LM root written
here carries that config and the tokenizer at the root, which ``--opd-student`` and the HF export read.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from ..config.model import CONFIG_FILE_NAME, ModelConfig
from ..runtime.distributed import global_rank
from ..runtime.platform import in_process_checkpoint_writes
from .atomic import atomic_directory_save

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0  # what Megatron-LM writes (and checks) for current checkpoints


def is_megatron_lm_root(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRACKER_FILE))


def iteration_dir(root: str) -> str:
    """The directory the tracker file points at (``iter_0000123`` or ``release``)."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"{root} is not a Megatron-LM checkpoint root (no {TRACKER_FILE})")
    with open(tracker) as f:
        text = f.read().strip()
    if text == RELEASE:
        name = RELEASE
    else:
        try:
            name = f"iter_{int(text):07d}"
        except ValueError:
            raise ValueError(f"{tracker} holds {text!r}; expected an iteration number or 'release'") from None
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"{path} (named by {TRACKER_FILE}) is not a dist checkpoint directory")
    return path


def load_megatron_lm_model(model, root: str, strict: bool = True) -> str:
    """Loads the model tensors of a Megatron-LM checkpoint (any TP/PP) into ``model``; returns the
    iteration directory read. Optimizer, RNG and ``args`` entries are not read."""
    from megatron.core import dist_checkpointing

    directory = iteration_dir(root)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Megatron-LM checkpoint {directory} does not match the model: "
                           f"missing={missing[:6]} unexpected={unexpected[:6]}")
    return directory


def save_as_megatron_lm(model, config: ModelConfig, root: str, tokenizer_dir: Optional[str] = None,
                        iteration: Optional[int] = None) -> str:
    """Writes ``model`` as a Megatron-LM checkpoint root (``release`` unless ``iteration``), with the
    student config and tokenizer beside it. Collective; the iteration directory appears whole or not at all."""
    from megatron.core import dist_checkpointing, parallel_state

    name = RELEASE if iteration is None else f"iter_{iteration:07d}"
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pinned = config.replace(padded_vocab=config.padded_vocab_size(tp))
    state = {"model": model.sharded_state_dict(), "checkpoint_version": CHECKPOINT_VERSION,
             "iteration": 0 if iteration is None else iteration}

    if global_rank() == 0:
        os.makedirs(root, exist_ok=True)
    def write(tmp: str) -> None:
        with in_process_checkpoint_writes():
            dist_checkpointing.save(state, tmp)

    atomic_directory_save(os.path.join(root, name), write)
    if global_rank() == 0:
        pinned.save(root)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            target = os.path.join(root, "tokenizer")
            if os.path.isdir(target):
                shutil.rmtree(target)
            shutil.copytree(tokenizer_dir, target)
        tmp = os.path.join(root, TRACKER_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(RELEASE if iteration is None else str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER_FILE))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return os.path.join(root, name)


def has_model_config(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE_NAME))
