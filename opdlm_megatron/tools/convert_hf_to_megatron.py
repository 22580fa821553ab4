"""Convert a HF decoder checkpoint (Llama, Mistral, Qwen2, Qwen3; safetensors) into an
opdlm-megatron checkpoint: a megatron-core distributed checkpoint (reloadable at any TP/PP) with
``opdlm_model_config.json`` and the HF tokenizer files under ``tokenizer/``.

Single process (TP=PP=1)::

    python tools/convert_hf_to_megatron.py --hf-dir HF --out CKPT [--add-mask-token]

Any TP/PP (each rank builds its part of the model and reads only its slices of the HF tensors)::

    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir HF --out CKPT --tp 2 --pp 2

Everything that can be wrong with the input (missing files, unsupported architecture, shapes that
disagree with config.json, a TP size that does not divide the heads) is checked before the model
is built; the checkpoint is written to a temporary directory and renamed into ``--out`` only when
complete, so a failed conversion leaves nothing at ``--out``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..checkpoint.tokenizer import copy_tokenizer_files
from ..config.model import ModelConfig, canonical_dtype
from ..runtime.outputs import check_output
from .hf_io import SafetensorsReader, read_hf_config, read_tokenizer_info
from .hf_mapping import (
    ConversionError,
    check_hf_tensors,
    layer_offset_names,
    mapping_for,
    megatron_shard,
    model_config_from_hf,
)
from .prepare_smollm2 import default_cache_dir, ensure_smollm2

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
INPUT_ERRORS = (ConversionError, ValueError, FileNotFoundError, FileExistsError)


@dataclass
class ConversionPlan:
    """Everything read and validated from the HF directory before any model is built."""

    config: ModelConfig
    reader: SafetensorsReader
    hf_vocab_rows: int

    @property
    def initialise_mask(self) -> bool:
        """[MASK] holds no trained embedding yet: the converter writes the mean token row into it."""
        return bool(self.config.source.get("mask_token_initialised", False))


def plan_conversion(
    hf_dir: str,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "fp32",
    add_mask_token: bool = False,
    mask_token_id: Optional[int] = None,
    ep: int = 1,
    **config_overrides,
) -> ConversionPlan:
    """Reads config.json, the tokenizer and the safetensors headers and checks them against each
    other and against the parallel layout. Raises ConversionError / FileNotFoundError naming the
    problem. ``add_mask_token`` is accepted for compatibility ([MASK] is always initialised)."""
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ConversionError(f"--{name} must be a positive integer, got {value!r}")
    hf, generation = read_hf_config(hf_dir)
    tokenizer_size, tokenizer_mask = read_tokenizer_info(hf_dir)
    config = model_config_from_hf(
        hf, generation, params_dtype=canonical_dtype(dtype), tokenizer_size=tokenizer_size,
        tokenizer_mask_token_id=tokenizer_mask, mask_token_id=mask_token_id, **config_overrides
    )
    config.check_parallel(tp, pp, ep)
    config.padded_vocab_size(tp)
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import HAVE_TE

        if not HAVE_TE:
            raise ConversionError("--transformer-impl transformer_engine needs Transformer Engine, which is not installed")
    reader = SafetensorsReader(hf_dir)
    rows = check_hf_tensors(config, reader.shapes(), [int(hf["vocab_size"])])
    return ConversionPlan(config, reader, rows)


@torch.no_grad()
def load_hf_weights(model, plan: ConversionPlan) -> None:
    """Fills this rank's part of ``model`` (a GPTModel built from ``plan.config``) from the HF
    checkpoint, reading only the slices this rank holds."""
    from megatron.core import parallel_state

    config = plan.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    padded = config.padded_vocab_size(tp)
    to_global = layer_offset_names(model)
    mean_rows: Dict[str, torch.Tensor] = {}

    def mask_row(hf_name: str) -> torch.Tensor:
        # [MASK] starts as the average token: a neutral input embedding / output row (the average
        # of the tokenizer's tokens, not of unused rows)
        if hf_name not in mean_rows:
            mean_rows[hf_name] = plan.reader.mean_row(hf_name, rows=config.num_tokens)
        return mean_rows[hf_name]

    for local_name, param in model.named_parameters():
        mapping = mapping_for(config, to_global(local_name))
        shard = megatron_shard(
            config, mapping, plan.reader.read, tp_rank, tp, padded, plan.hf_vocab_rows,
            mask_row if plan.initialise_mask else None,
        )
        if tuple(shard.shape) != tuple(param.shape):
            raise ConversionError(
                f"shape mismatch for {mapping.megatron} (from {list(mapping.hf)}): "
                f"built {list(shard.shape)}, the model expects {list(param.shape)}"
            )
        param.copy_(shard.to(param.dtype))


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def conversion_runtime(tp: int, pp: int, ep: int = 1):
    """Uses the caller's megatron runtime if one is initialised (it must have this TP/PP/EP), else
    starts a CPU one for the conversion and closes it afterwards."""
    from megatron.core import parallel_state

    from ..runtime.platform import initialize_runtime

    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size())
        if have != (tp, pp, ep):
            raise ConversionError(f"the running megatron runtime has TP/PP/EP {have}, but the conversion asks for "
                                  f"{(tp, pp, ep)}")
        yield
        return
    world = _world_size()
    need = tp * pp * max(ep, 1)
    if world % need != 0 or world % (tp * pp) != 0:
        raise ConversionError(
            f"--tp {tp} x --pp {pp} x --ep {ep} needs a multiple of {need} processes, but the world size is {world}; "
            f"launch with torchrun --nproc_per_node={need}"
        )
    with initialize_runtime(tp, pp, device="cpu", expert_model_parallel_size=ep):
        yield


def convert(
    hf_dir: str,
    out: str,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "fp32",
    add_mask_token: bool = False,
    overwrite: bool = False,
    mask_token_id: Optional[int] = None,
    ep: int = 1,
    **config_overrides,
) -> ModelConfig:
    """Converts ``hf_dir`` into an opdlm-megatron checkpoint at ``out``; returns its config.

    Runs in-process (TP=PP=EP=1, under an existing runtime or a temporary CPU one) or on every rank of
    a torchrun job (``ep``: each expert-parallel rank reads and saves its own experts). ``config_overrides`` set ModelConfig fields (e.g. ``block_size``,
    ``logit_shift``, ``transformer_impl``, ``make_vocab_size_divisible_by``).
    """
    from ..checkpoint.atomic import atomic_directory_save
    from ..checkpoint.model import save_model_checkpoint
    from ..model.build import build_model

    check_output(out, "--out", "dir", [("--hf-dir", hf_dir)], replaces=True)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass overwrite=True / --overwrite to replace it)")
    plan = plan_conversion(hf_dir, tp, pp, dtype, add_mask_token, mask_token_id, ep, **config_overrides)
    with conversion_runtime(tp, pp, ep):
        import torch.distributed as dist

        model = build_model(plan.config, "student", perform_initialization=False)
        load_hf_weights(model, plan)
        config = plan.config.replace(padded_vocab=plan.config.padded_vocab_size(tp))

        def write(tmp: str) -> None:
            save_model_checkpoint(model, tmp, config)
            if dist.get_rank() == 0:
                copied = copy_tokenizer_files(hf_dir, os.path.join(tmp, TOKENIZER_SUBDIR))
                if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
                    logger.warning("%s has no tokenizer files; the checkpoint has no tokenizer/", hf_dir)

        atomic_directory_save(out, write)
    logger.info("converted %s -> %s (TP=%d, PP=%d, EP=%d, %s)", hf_dir, out, tp, pp, ep, config.params_dtype)
    return config


def ensure_converted_smollm2(block_size: int = 4, cache_dir: Optional[str] = None) -> str:
    """Path of SmolLM2-135M-Instruct converted with ``convert``'s defaults (no logit shift: the AR teacher the
    benchmarks measure), converting it into the cache on first use. ``convert`` renames a complete directory
    into place, so an existing one is a finished conversion."""
    ckpt = os.path.join(cache_dir or default_cache_dir(), f"smollm2-135m-instruct-opd-b{block_size}")
    if not os.path.isdir(ckpt):
        convert(ensure_smollm2(cache_dir), ckpt, block_size=block_size)
    return ckpt
