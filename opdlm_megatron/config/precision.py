"""FP8 through Transformer Engine, for the student and the frozen teacher separately.

``PrecisionConfig`` (``model.student_precision`` / ``model.teacher_precision`` in the training YAML)
maps onto megatron-core's ``TransformerConfig`` FP8 fields (``fp8``, ``fp8_recipe``, ``fp8_param``,
``first_last_layers_bf16`` with its layer counts); megatron's TE layers then run their GEMMs in FP8.
``check_fp8_runtime`` refuses, with one line each, what cannot work: FP8 with the local layer spec,
without CUDA, without Transformer Engine, on a GPU without FP8 (compute capability < 8.9; MXFP8 needs
10.0), or with non-BF16 parameters.

Two places where OPD must step around FP8:

* Rollouts run in BF16 (``fp8_disabled``): TE's FP8 GEMMs need the token count divisible by 8 and
  the hidden size by 16, and a KV-cached round of a block of 4 is neither; megatron's transformer
  block enters FP8 by itself whenever ``config.fp8`` is set, so the engine switches it off around a
  rollout.
* Training batches are padded to a multiple of ``FP8_SEQUENCE_MULTIPLE`` columns
  (``fp8_sequence_multiple``): padding columns are invalid keys and no loss reads them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # torch loads with the first model, not with the configs (command lines start fast)
    import torch

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
FP8_SEQUENCE_MULTIPLE = 16
MIN_FP8_CAPABILITY = (8, 9)  # Ada / Hopper
MIN_MXFP8_CAPABILITY = (10, 0)  # Blackwell


@dataclass
class PrecisionConfig:
    """FP8 settings of one model (None: no FP8; the model runs in its parameter dtype)."""

    fp8: Optional[str] = None  # "e4m3" | "hybrid" (E4M3 forward, E5M2 gradients)
    fp8_recipe: str = "tensorwise"  # current per-tensor scaling; delayed | blockwise | mxfp8
    fp8_param: bool = False  # keep the weights themselves in FP8 (the frozen teacher: half the memory)
    first_last_layers_bf16: bool = True  # the usual stability choice for FP8 training
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    def validate(self, where: str = "precision") -> None:
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"{where}.fp8 must be one of {list(FP8_FORMATS)} or null, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"{where}.fp8_recipe must be one of {list(FP8_RECIPES)}, got {self.fp8_recipe!r}")
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{name} must be an integer >= 0, got {value!r}")
        if self.fp8 is None and self.fp8_param:
            raise ValueError(f"{where}.fp8_param needs {where}.fp8 (e4m3 or hybrid)")

    @property
    def enabled(self) -> bool:
        return self.fp8 is not None

    def transformer_overrides(self, num_layers: int) -> Dict:
        """megatron ``TransformerConfig`` fields for these settings ({} without FP8)."""
        if not self.enabled:
            return {}
        if self.first_last_layers_bf16 and self.num_layers_at_start_in_bf16 + self.num_layers_at_end_in_bf16 >= num_layers:
            raise ValueError(f"{self.num_layers_at_start_in_bf16} + {self.num_layers_at_end_in_bf16} BF16 layers leave "
                             f"none of the model's {num_layers} layers in FP8")
        return dict(fp8=self.fp8, fp8_recipe=self.fp8_recipe, fp8_param=self.fp8_param,
                    first_last_layers_bf16=self.first_last_layers_bf16,
                    num_layers_at_start_in_bf16=self.num_layers_at_start_in_bf16,
                    num_layers_at_end_in_bf16=self.num_layers_at_end_in_bf16)


def check_fp8_runtime(precision: PrecisionConfig, transformer_impl: str, params_dtype: str, device: torch.device,
                      who: str = "model", capability=None, te_available: Optional[bool] = None) -> None:
    """Raises ValueError naming why FP8 cannot run here (nothing when ``precision`` has no FP8).
    ``capability`` / ``te_available`` default to this machine's (tests pass them)."""
    if not precision.enabled:
        return
    if transformer_impl != "transformer_engine":
        raise ValueError(f"{who}: FP8 needs the Transformer Engine layer spec (transformer_impl='transformer_engine'), "
                         f"the config has {transformer_impl!r}")
    if device.type != "cuda":
        raise ValueError(f"{who}: FP8 needs a CUDA GPU; this run is on {device.type}")
    if te_available is None:
        from megatron.core.extensions.transformer_engine import HAVE_TE as te_available
    if not te_available:
        raise ValueError(f"{who}: FP8 needs Transformer Engine (pip install 'opdlm-megatron[te]')")
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability(device)
    needed = MIN_MXFP8_CAPABILITY if precision.fp8_recipe == "mxfp8" else MIN_FP8_CAPABILITY
    if tuple(capability) < needed:
        raise ValueError(f"{who}: fp8_recipe {precision.fp8_recipe!r} needs compute capability >= "
                         f"{needed[0]}.{needed[1]}, this GPU has {capability[0]}.{capability[1]}")
    if params_dtype != "bfloat16":
        raise ValueError(f"{who}: FP8 runs with bfloat16 parameters (master weights); the config has {params_dtype}")


@contextlib.contextmanager
def fp8_disabled(model):
    """Runs the block with the model's ``config.fp8`` unset (megatron's transformer block then stays
    out of FP8): rollouts decode in the parameter dtype."""
    config = getattr(model, "config", None)
    saved = getattr(config, "fp8", None)
    if saved is None:
        yield
        return
    config.fp8 = None
    try:
        yield
    finally:
        config.fp8 = saved


def fp8_sequence_multiple(model) -> int:
    """The column multiple a training batch of ``model`` is padded to (1 without FP8)."""
    return FP8_SEQUENCE_MULTIPLE if getattr(getattr(model, "config", None), "fp8", None) else 1


def pad_batch(input_ids: torch.Tensor, layout, multiple: int, pad_token_id: Optional[int]):
    """``(input_ids, layout)`` with invalid columns appended up to a multiple of ``multiple``
    (``AttentionLayout.pad_columns``; pad token, default 0): FP8 GEMMs need whole multiples of 16
    columns, and the padding is never attended to or read."""
    layout = layout.pad_columns(multiple)
    extra = layout.seq_len - input_ids.shape[1]
    if extra:
        import torch

        pad = input_ids.new_full((input_ids.shape[0], extra), pad_token_id if pad_token_id is not None else 0)
        input_ids = torch.cat([input_ids, pad], 1)
    return input_ids, layout
