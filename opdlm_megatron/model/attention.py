"""FlexAttention core attention: the structured path of the attention-mask provider.

Drop-in for megatron-core's ``core_attention`` submodule (same constructor and forward signature as
``DotProductAttention``). Instead of a dense ``[B, 1, Sq, Sk]`` mask it takes the FlexAttention
``BlockMask`` built by ``AttentionLayout.flex_block_mask`` from the same rule, so fully masked tiles
(across blocks, across the x0/xt streams) are skipped instead of computed and discarded.

On CUDA the kernel is compiled once per process; on CPU eager FlexAttention runs torch's reference
implementation (correct, not fast), which is what the equivalence tests exercise. torch has no
FlexAttention backward on CPU, so CPU training uses ``attention_backend="dense"``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor

_compiled_flex = None


def _flex_attention_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexCoreAttention(MegatronModule):
    """Core attention over ``[sq, b, heads, dim]`` tensors driven by a FlexAttention ``BlockMask``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("FlexCoreAttention does not support context parallelism")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"FlexCoreAttention does not implement attention dropout (got {dropout})")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ) -> Tensor:
        from torch.nn.attention.flex_attention import BlockMask

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("FlexCoreAttention supports neither packed sequences nor attention bias")
        if attention_mask is not None and not isinstance(attention_mask, BlockMask):
            raise TypeError(
                "FlexCoreAttention expects a FlexAttention BlockMask (AttentionLayout.flex_block_mask), "
                f"got {type(attention_mask).__name__}; use attention_backend='dense' for dense masks"
            )
        sq, bsz = query.shape[0], query.shape[1]
        # megatron: [s, b, heads, dim] -> flex: [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attend = _flex_attention_fn(q.device)
        with warnings.catch_warnings():
            # eager (CPU) FlexAttention warns that it is unfused on every call; that is expected here
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = attend(
                q, k, v, block_mask=attention_mask, scale=self.softmax_scale,
                enable_gqa=self.heads_per_partition != self.groups_per_partition,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, bsz, -1)
