"""Export an opdlm-megatron checkpoint (any TP/PP it was saved at) as a HF model directory:
safetensors + ``config.json`` + tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained``.

    python tools/convert_megatron_to_hf.py --megatron-dir CKPT --out HF [--dtype bf16]

The checkpoint is loaded single-process into a TP=1/PP=1 model (megatron's dist_checkpointing
reshards it), then written tensor by tensor, one safetensors shard in memory at a time. Padded
vocabulary rows are dropped. A student whose ``[MASK]`` row was added deliberately keeps it (HF
``vocab_size`` grows by one) and ``config.json`` records ``opdlm_mask_token_id``,
``opdlm_tokenizer_vocab_size``, ``opdlm_block_size`` and ``opdlm_logit_shift``, so converting the
export back gives the same checkpoint bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Optional, Union

import torch

from ..checkpoint.tokenizer import copy_tokenizer_files
from ..config.choices import QUANTIZED_EXPORTS
from ..config.model import DTYPES, canonical_dtype
from ..runtime.outputs import check_output
from .convert_hf_to_megatron import TOKENIZER_SUBDIR
from .hf_io import ShardedSafetensorsWriter, write_json
from .hf_mapping import (ConversionError, hf_config_from_model_config, hf_ranges, hf_tensors, hf_vocab_rows,
                         mapping_for, model_mappings)

logger = logging.getLogger(__name__)

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from ``5000000``, ``"500MB"``, ``"5GB"``, ``"2GiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConversionError(f"cannot parse shard size {size!r}; use e.g. 500MB, 5GB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


@contextlib.contextmanager
def _single_process_runtime():
    from megatron.core import parallel_state

    from ..runtime.platform import initialize_runtime

    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size())
        if sizes != (1, 1):
            raise ConversionError(f"export runs at TP=1/PP=1, but the running megatron runtime has TP/PP {sizes}")
        yield
        return
    with initialize_runtime(1, 1, device="cpu"):
        yield


def export(
    megatron_dir: str,
    out: str,
    dtype: Optional[str] = None,
    include_mask_token: Optional[bool] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    quantized_format: str = "unified",
) -> str:
    """Writes the HF export of ``megatron_dir`` to ``out`` atomically; returns ``out``.

    ``dtype``: defaults to the checkpoint's. ``include_mask_token``: keep the appended [MASK] row
    (None: when the checkpoint recorded it as added on purpose). A quantized checkpoint: ``quantized_format``
    ``unified`` (ModelOpt's deployment checkpoint, ``write_quantized``) or ``modelopt_state`` (the HF model
    fake-quantized, with ModelOpt's state: ``write_modelopt_state``).
    """
    if quantized_format not in QUANTIZED_EXPORTS:
        raise ValueError(f"quantized export format {quantized_format!r} is not one of {list(QUANTIZED_EXPORTS)}")
    from ..checkpoint.atomic import atomic_directory_save
    from ..checkpoint.model import build_from_checkpoint, is_checkpoint, load_model_config

    if not os.path.isdir(megatron_dir):
        raise FileNotFoundError(f"megatron checkpoint directory not found: {megatron_dir}")
    if not is_checkpoint(megatron_dir):
        raise FileNotFoundError(
            f"{megatron_dir} is not an opdlm-megatron checkpoint (needs metadata.json and opdlm_model_config.json)"
        )
    check_output(out, "--out", "dir", [("--megatron-dir", megatron_dir)], replaces=True)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass overwrite=True / --overwrite to replace it)")
    config = load_model_config(megatron_dir)
    dtype = canonical_dtype(dtype or config.params_dtype)
    torch_dtype = DTYPES[dtype]
    shard_bytes = parse_size(max_shard_size)
    hf_config = hf_config_from_model_config(config, dtype, include_mask_token)
    rows = hf_vocab_rows(config, include_mask_token)

    with _single_process_runtime():
        model, config = build_from_checkpoint(megatron_dir, "teacher", device=torch.device("cpu"), perform_initialization=False)
        state = model.state_dict()

        def write(tmp: str) -> None:
            if config.quantization is not None and quantized_format == "unified":
                write_quantized(model, hf_config, rows, torch_dtype, tmp)
            else:
                writer = ShardedSafetensorsWriter(tmp, shard_bytes)
                for mapping in model_mappings(config):
                    if mapping.megatron not in state:
                        raise ConversionError(f"checkpoint model has no parameter {mapping.megatron!r}")
                    for name, tensor in hf_tensors(config, mapping, state[mapping.megatron], rows).items():
                        writer.add(name, tensor.to(torch_dtype))
                writer.close()
                write_json(os.path.join(tmp, "config.json"), hf_config)
                if config.quantization is not None:
                    write_modelopt_state(model, config, torch_dtype, tmp)
            copy_tokenizer_files(os.path.join(megatron_dir, TOKENIZER_SUBDIR), tmp)

        atomic_directory_save(out, write)
    logger.info("exported %s -> %s (%s, vocab rows %d%s)", megatron_dir, out, dtype, rows,
                f", ModelOpt {config.quantization}" if config.quantization else "")
    return out


def write_quantized(model, hf_config: dict, rows: int, dtype: torch.dtype, directory: str) -> None:
    """A quantized student as ModelOpt's unified HF checkpoint (what TensorRT-LLM, vLLM and SGLang load):
    ModelOpt's exporter writes the quantized linear layers in their format (FP8: ``float8_e4m3fn`` weights
    with ``weight_scale`` / ``input_scale``) and ``quantization_config`` / ``hf_quant_config.json``; the
    config keeps the student's ``opdlm_*`` fields (mask token, block size, logit shift); the embedding and
    output rows are cut to the exported vocabulary, as the unquantized export does."""
    import json
    import tempfile

    from safetensors.torch import load_file, save_file

    from ..model.quantization import modelopt_export

    with tempfile.TemporaryDirectory() as source:  # the architecture ModelOpt maps the layers by
        write_json(os.path.join(source, "config.json"), hf_config)
        modelopt_export().export_mcore_gpt_to_hf(model, source, dtype=dtype, export_dir=directory)
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weight_map:
            shard = os.path.join(directory, weight_map[name])
            tensors = load_file(shard)
            tensors[name] = tensors[name][:rows].contiguous()
            save_file(tensors, shard, metadata={"format": "pt"})


def write_modelopt_state(model, config, dtype: torch.dtype, directory: str) -> None:
    """Turns the plain HF export in ``directory`` into ModelOpt's fake-quantized HF checkpoint: the HF model
    gets the format's quantizers (ModelOpt's recipe on transformers' modules), their ranges and smoothing
    scales are the student's (a fused megatron layer's go to each HF projection it is made of, per-channel
    ones split as the weight rows are), and ``save_pretrained`` with ModelOpt's HF checkpointing on writes
    them with ``modelopt_state.pth``. It loads back with ModelOpt's HF path
    (``mto.enable_huggingface_checkpointing()``, then ``from_pretrained``) as the same quantized model."""
    from transformers import AutoModelForCausalLM

    from ..model.quantization import modelopt_export, quantization_exclude_of, quantization_of, quantize

    if quantization_exclude_of(model):
        raise ConversionError("a student quantized with exclude patterns (megatron module names) exports only as "
                              "--quantized-format unified")
    fmt = quantization_of(model)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        # ModelOpt makes the quantizers' buffers while it calibrates: one forward (SmoothQuant rescales the
        # weights on the way; they are put back below), then every range is replaced by the student's
        quantize(hf, fmt, lambda m: m(input_ids=torch.zeros(1, config.block_size, dtype=torch.long)), "cpu")
        hf.load_state_dict(weights, strict=False)

        for number, layer in enumerate(model.decoder.layers):
            for local in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                          "mlp.linear_fc2"):
                megatron = layer.get_submodule(local)
                mapping = mapping_for(config, f"decoder.layers.{number}.{local}.weight")
                pre_quant = getattr(megatron.input_quantizer, "pre_quant_scale", None)
                for hf_name, weight_amax in hf_ranges(config, mapping, megatron.weight_quantizer.amax).items():
                    module = hf.get_submodule(hf_name.rsplit(".", 1)[0])
                    module.weight_quantizer.amax = weight_amax.clone()
                    module.input_quantizer.amax = megatron.input_quantizer.amax.clone()
                    if pre_quant is not None:
                        module.input_quantizer.pre_quant_scale = pre_quant.clone()
    modelopt_export()  # ModelOpt present (quantize above needed it too)
    import modelopt.torch.opt as mto

    mto.enable_huggingface_checkpointing()
    hf.save_pretrained(directory)
