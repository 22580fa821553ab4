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
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from ..runtime.platform import compute_device

QUANT_FORMATS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
CUDA_ONLY_FORMATS = ("nvfp4",)


def modelopt_quantization():
    """``modelopt.torch.quantization``, or a ValueError saying how to install it."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise ValueError("quantization needs NVIDIA ModelOpt: pip install 'opdlm-megatron[modelopt]'") from None
    return mtq


def quantization_recipe(fmt: str, device_type: str) -> dict:
    """A copy of ModelOpt's recipe for ``fmt``; a ValueError naming the format for one this machine cannot run."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantization format {fmt!r} is not one of {sorted(QUANT_FORMATS)}")
    if fmt in CUDA_ONLY_FORMATS and device_type != "cuda":
        raise ValueError(f"quantization format {fmt!r} runs on CUDA GPUs only (ModelOpt's NVFP4 block quantization "
                         f"needs CUDA tensors); on {device_type} use fp8 or int8_sq")
    return copy.deepcopy(getattr(modelopt_quantization(), QUANT_FORMATS[fmt]))


def quantize(model, fmt: str, forward_loop: Optional[Callable] = None, device_type: Optional[str] = None):
    """Quantizes ``model`` in place with ModelOpt's ``fmt`` recipe, calibrated over the forwards
    ``forward_loop(model)`` runs (None: weights only); marks it (``opd_quantization``) and returns it.
    ``device_type``: where it runs (None: where models go, ``compute_device``)."""
    recipe = quantization_recipe(fmt, device_type or compute_device().type)
    model = modelopt_quantization().quantize(model, recipe, forward_loop)
    model.opd_quantization = fmt
    return model


def quantization_of(model) -> Optional[str]:
    """The format ``model`` was quantized to, None when it was not."""
    return getattr(model, "opd_quantization", None)
