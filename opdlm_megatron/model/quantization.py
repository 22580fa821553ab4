"""Post-training quantization of a student with NVIDIA ModelOpt (the ``modelopt`` extra).

ModelOpt's Megatron-Core plugin swaps megatron's linear layers (``ColumnParallelLinear`` /
``RowParallelLinear``, any TP) for quantized ones: each gets an input and a weight quantizer
(fake quantization: values are rounded to the format's grid and kept in the model's dtype), and
``mtq.quantize`` calibrates their ranges (``amax``) over the forwards a ``forward_loop`` runs. What
the student is calibrated on is the caller's choice; ``rollout/calibration.py`` calibrates on the
block-diffusion states its own decoding meets.

Formats (ModelOpt's recipes; the output layer, routers and embeddings stay unquantized, as in them):

* ``fp8``: FP8 E4M3, one scale per tensor for inputs and weights (``FP8_DEFAULT_CFG``);
* ``int8_sq``: INT8 SmoothQuant, per-channel weights, per-tensor inputs after smoothing
  (``INT8_SMOOTHQUANT_CFG``);
* ``nvfp4``: NVFP4, 16-element blocks with FP8 scales (``NVFP4_DEFAULT_CFG``); its dynamic block
  quantization runs on CUDA tensors only, so it is refused on CPU.

A quantized model decodes through megatron's forward (the fused decoding forward reads the raw weights and
would skip the quantizers: ``rollout/fused_forward.unsupported_reason`` names it).

Checkpoints: the format is the model config's ``quantization``; the quantizers' ranges (``_amax``) and
SmoothQuant's smoothing scales (``_pre_quant_scale``) are buffers of the linear layers, saved and loaded as
tensors through megatron's sharded state dict like the weights. ModelOpt's own serialized state (the linear
layers' ``_extra_state``: ``torch.save`` bytes) is neither written nor read: a model built from a quantized
config gets its quantizers back from the recipe (``insert_quantizers``) and the checkpoint fills them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Callable, Optional, Sequence

import torch

from ..config.choices import QUANT_FORMATS as FORMAT_NAMES
from ..runtime.platform import compute_device

# each format's recipe in modelopt.torch.quantization
QUANT_FORMATS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
assert tuple(QUANT_FORMATS) == FORMAT_NAMES
CUDA_ONLY_FORMATS = ("nvfp4",)

logger = logging.getLogger(__name__)


def modelopt_quantization():
    """``modelopt.torch.quantization``, or a ValueError saying how to install it."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise ValueError("quantization needs NVIDIA ModelOpt: pip install 'opdlm-megatron[modelopt]'") from None
    return mtq


def modelopt_export():
    """``modelopt.torch.export`` (its unified HF exporter), or a ValueError saying how to install it."""
    modelopt_quantization()
    import modelopt.torch.export as export

    return export


def quantization_recipe(fmt: str, device_type: str) -> dict:
    """A copy of ModelOpt's recipe for ``fmt``; a ValueError naming the format for one this machine cannot run."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantization format {fmt!r} is not one of {sorted(QUANT_FORMATS)}")
    if fmt in CUDA_ONLY_FORMATS and device_type != "cuda":
        raise ValueError(f"quantization format {fmt!r} runs on CUDA GPUs only (ModelOpt's NVFP4 block quantization "
                         f"needs CUDA tensors); on {device_type} use fp8 or int8_sq")
    return copy.deepcopy(getattr(modelopt_quantization(), QUANT_FORMATS[fmt]))


def quantize(model, fmt: str, forward_loop: Optional[Callable] = None, device_type: Optional[str] = None,
             exclude: Sequence[str] = ()):
    """Quantizes ``model`` in place with ModelOpt's ``fmt`` recipe, calibrated over the forwards
    ``forward_loop(model)`` runs (None: weights only); marks it (``opd_quantization``) and returns it.
    ``device_type``: where it runs (None: where models go, ``compute_device``). ``exclude``: fnmatch
    patterns of megatron module names whose linear layers stay unquantized (``decoder.layers.0.*``,
    ``*linear_fc2``), beside those ModelOpt's recipe leaves alone (the output layer, routers)."""
    recipe = quantization_recipe(fmt, device_type or compute_device().type)
    for pattern in exclude:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"quantization exclude patterns are module-name patterns (strings), got {pattern!r}")
        recipe["quant_cfg"].append({"quantizer_name": f"{pattern}.*quantizer", "enable": False})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # ModelOpt prints its progress ("Inserted 51 quantizers")
        model = modelopt_quantization().quantize(model, recipe, forward_loop)
    for line in printed.getvalue().splitlines():
        logger.info("modelopt: %s", line)
    model.opd_quantization = fmt
    model.opd_quantization_exclude = list(exclude)
    if getattr(model, "opd_config", None) is not None:  # what a checkpoint of it records
        model.opd_config = model.opd_config.replace(quantization=fmt, quantization_exclude=list(exclude))
    return model


def insert_quantizers(model, fmt: str, device_type: Optional[str] = None, exclude: Sequence[str] = ()):
    """Gives ``model`` the quantizers of ``fmt`` with placeholder ranges, for a checkpoint to fill.

    ModelOpt creates a quantizer's range buffers (and SmoothQuant its smoothing scales and smoothed
    weights) while it calibrates, so the calibration here feeds every megatron linear layer one input of
    ones, directly (any TP / PP stage / expert layout, no model forward); everything it sets - ranges,
    scales, the weights SmoothQuant rescaled - is replaced by the checkpoint's tensors on load."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.utils import get_pg_size

    def feed_ones(quantized) -> None:
        for module in quantized.modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or module.weight is None:
                continue
            parallel_input = isinstance(module, RowParallelLinear) and module.input_is_parallel
            width = module.input_size_per_partition if parallel_input else module.input_size
            # sequence parallelism splits the sequence over the TP ranks: one row per rank
            rows = get_pg_size(module.tp_group) if getattr(module, "sequence_parallel", False) else 1
            module(torch.ones(rows, 1, width, dtype=module.weight.dtype, device=module.weight.device))

    training = model.training
    model.eval()
    with torch.no_grad():
        for parameter in model.parameters():
            # uninitialised memory (a build for loading: perform_initialization=False): ModelOpt refuses to
            # take a range of NaN; the load that follows replaces these weights anyway
            if not torch.isfinite(parameter).all():
                parameter.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        quantize(model, fmt, feed_ones, device_type, exclude)
    model.train(training)
    return model


def quantization_of(model) -> Optional[str]:
    """The format ``model`` was quantized to, None when it was not."""
    return getattr(model, "opd_quantization", None)


def quantization_exclude_of(model) -> list:
    """The module-name patterns ``model``'s quantization left unquantized."""
    return list(getattr(model, "opd_quantization_exclude", []))


def checkpoint_sharded_state(model, state: dict) -> dict:
    """``state`` (``model``'s megatron sharded state dict) as checkpoints hold it: unchanged for an unquantized
    model. For a quantized one: without ModelOpt's serialized per-layer state (``_extra_state``: pickled bytes,
    never read back; the config's format rebuilds the quantizers, ``insert_quantizers``), and with SwiGLU's
    per-channel weight ranges (INT8 SmoothQuant's ``linear_fc1.weight_quantizer._amax``, one per output row)
    split into their gate and up halves as megatron splits the weight, so that they reload at another TP
    size (ModelOpt shards them as one block of rows: the halves' order would depend on TP)."""
    if quantization_of(model) is None:
        return state
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    gated = getattr(model.config, "gated_linear_unit", False)
    result = {}
    for key, value in state.items():
        if key.endswith("._extra_state"):
            continue
        if (gated and key.endswith(".mlp.linear_fc1.weight_quantizer._amax") and isinstance(value, ShardedTensor)
                and value.prepend_axis_num == 0 and value.local_shape[0] > 1):
            value = apply_swiglu_sharded_factory(value, ())
        result[key] = value
    return result
