"""One model forward across pipeline stages, and the last stage's decisions sent to every stage.

Decoding runs one forward per denoising step, so stages hand activations on with megatron-core's
``P2PCommunicator`` (first stage -> ... -> last stage) and the last stage, which alone sees logits,
decides the tokens. ``broadcast_from_last_stage`` then gives every stage the same decisions over the
pipeline group (each TP rank has its own pipeline group, so all ranks learn them), which keeps all
ranks in agreement on the decoding state, including which sequences have finished.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from torch import Tensor

from ..runtime.distributed import broadcast_from_last_stage


class StageRunner:
    """Runs this rank's pipeline stage of ``model`` for one forward pass."""

    def __init__(self, model, fused=None) -> None:
        self.model = model
        self.fused = fused  # a FusedDecodeForward of ``model`` (its forward replaces megatron's), or None
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.is_first = parallel_state.is_pipeline_first_stage()
        self.is_last = parallel_state.is_pipeline_last_stage()
        self.hidden_size = model.config.hidden_size
        self._comm = None
        if self.pp_size > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            self.pp_group = parallel_state.get_pipeline_model_parallel_group()
            self._comm = P2PCommunicator(self.pp_group, model.config)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask,
                columns: Optional[Tensor] = None, cache=None) -> Optional[Tensor]:
        """Vocab-parallel logits ``[B, S, V/TP]`` on the last stage, None elsewhere; with ``columns``
        ``[B, K]`` only those columns go through the output layer (``[B, K, V/TP]``). ``cache``: the
        ``BlockKVCache`` the fused forward reads (the megatron forward reaches it through hooks)."""
        from ..model.build import logits_at_columns
        from ..runtime.platform import cpu_shim_suspended

        received = None
        if self._comm is not None:
            shape = (input_ids.shape[1], input_ids.shape[0], self.hidden_size)
            received = self._comm.recv_forward(shape, is_first_stage=self.is_first)
            self.model.set_input_tensor(received)
        if self.fused is not None:
            with cpu_shim_suspended():  # plain torch ops on tensors already in place: nothing to redirect
                output = self.fused(input_ids, position_ids, attention_mask, columns, received, cache)
        elif columns is None:
            output = self.model(input_ids, position_ids, attention_mask)
        else:
            output = logits_at_columns(self.model, input_ids, position_ids, attention_mask, columns)
        if self._comm is not None:
            self._comm.send_forward(output, is_last_stage=self.is_last)
        return output if self.is_last else None

    def broadcast_from_last_stage(self, tensor: Optional[Tensor], shape, dtype, device) -> Tensor:
        """The last stage's ``tensor`` on every stage (others pass None and get a copy)."""
        if self._comm is None:
            return tensor
        if not self.is_last:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        return broadcast_from_last_stage(tensor.contiguous())
