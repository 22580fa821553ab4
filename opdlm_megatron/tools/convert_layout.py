"""Re-save a model checkpoint in the other layout: this project's ``<dir>/`` (dist checkpoint +
``opdlm_model_config.json``) <-> Megatron-LM's ``<root>/release/`` + ``latest_checkpointed_iteration.txt``.

    opdlm-convert-layout --src student_ckpt --dst mlm_root --to megatron-lm   # for --pretrained-checkpoint
    opdlm-convert-layout --src mlm_root --dst student_ckpt --to opdlm         # e.g. an OPD run's --save

Both layouts hold the same dist-checkpoint tensors (same keys), load at any TP/PP and carry the
student config and tokenizer; ``opdlm-convert-megatron-to-hf`` and ``--opd-student`` read either.
Runs in one process on CPU; the destination appears whole or not at all.
"""

from __future__ import annotations

import os
import shutil

from ..runtime.outputs import check_output

LAYOUTS = ("megatron-lm", "opdlm")


def convert_layout(src: str, dst: str, to: str, overwrite: bool = False) -> str:
    import torch

    from ..checkpoint.megatron_lm import is_megatron_lm_root, save_as_megatron_lm
    from ..checkpoint.model import build_from_checkpoint, is_checkpoint, save_model_checkpoint
    from .convert_megatron_to_hf import _single_process_runtime

    if to not in LAYOUTS:
        raise ValueError(f"--to must be one of {list(LAYOUTS)}, got {to!r}")
    if not is_checkpoint(src):
        raise FileNotFoundError(f"--src {src} is not a model checkpoint (needs opdlm_model_config.json and "
                                "metadata.json or latest_checkpointed_iteration.txt)")
    if (to == "megatron-lm") == is_megatron_lm_root(src):
        raise ValueError(f"--src {src} is already in the {to} layout")
    check_output(dst, "--dst", "dir", [("--src", src)], replaces=True)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"--dst {dst} already exists (pass --overwrite to replace it)")
    tokenizer = os.path.join(src, "tokenizer")
    with _single_process_runtime():
        model, config = build_from_checkpoint(src, "teacher", device=torch.device("cpu"), perform_initialization=False)
        if to == "megatron-lm":
            if os.path.exists(dst):
                shutil.rmtree(dst)
            save_as_megatron_lm(model, config, dst, tokenizer_dir=tokenizer)
        else:
            save_model_checkpoint(model, dst, config,
                                  write_extra_files=lambda tmp: os.path.isdir(tokenizer)
                                  and shutil.copytree(tokenizer, os.path.join(tmp, "tokenizer")))
    return dst
