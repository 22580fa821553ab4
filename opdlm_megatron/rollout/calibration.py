"""Quantizing a student calibrated on its own decoding (``model/quantization.py``).

A block-diffusion student does not meet causal text at inference: every forward of its decoding holds a
block of ``[MASK]`` slots being revealed, over the cached blocks before it. ModelOpt calibrates the
quantizers' ranges over whatever forwards the calibration loop runs, so the loop here decodes the user's
prompts with the engine (megatron's forward: the quantizers sit in its linear layers): the ranges are
those of the states the student actually meets when it serves.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..config.model import ModelConfig
from ..model.quantization import quantize
from .config import DecodeConfig
from .engine import DiffusionRolloutEngine


def quantize_on_rollouts(model, config: ModelConfig, fmt: str, prompts: Sequence[Sequence[int]],
                         decode: Optional[DecodeConfig] = None, batch_size: int = 8, exclude: Sequence[str] = ()):
    """Quantizes ``model`` (in place, returned) to ``fmt``, calibrated on the forwards of decoding ``prompts``
    (``batch_size`` at a time) with ``decode`` (default: the engine's, the model's block size); ``exclude``:
    module-name patterns left unquantized (``model/quantization.quantize``)."""
    if not prompts:
        raise ValueError("quantization calibration needs at least one prompt")

    def decode_prompts(calibrated) -> None:
        engine = DiffusionRolloutEngine(calibrated, config, forward_impl="megatron")
        for start in range(0, len(prompts), batch_size):
            engine.generate(prompts[start:start + batch_size], decode)

    training = model.training
    model.eval()
    quantize(model, fmt, decode_prompts, exclude=exclude)
    model.train(training)
    return model
