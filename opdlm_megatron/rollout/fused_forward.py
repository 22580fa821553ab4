"""An inference-only forward over a megatron-core GPTModel's own parameters, for decoding.

Why: a cached block forward of SmolLM2-135M through megatron's modules cost ~2× HF's one-token
decode step on CPU, and about half of it was neither matmuls nor attention but per-module work
(autograd-function wrappers of the parallel linears, bias-dropout-add and offload plumbing, the CPU
shim's ``TorchFunctionMode`` seeing every op). Decoding needs none of it: no gradients, no dropout,
no sequence parallelism. This path reads the *same* parameter tensors (nothing is copied, so it
always sees the current weights during training) and runs the layer maths with plain torch ops:

    embedding (megatron's module) -> per layer: norm -> QKV -> RoPE -> attention (SDPA, cached keys
    in front) -> proj (+ TP all-reduce) -> residual -> norm -> fc1 -> GLU -> fc2 (+ all-reduce) ->
    residual -> final norm -> output layer on the predicting columns only

It covers the layouts this project builds on CPU and GPU without Transformer Engine (megatron's
local spec: ColumnParallel/RowParallel linears, RMSNorm or LayerNorm, GQA, RoPE, gated or plain MLP),
at any TP (``num_query_groups >= TP``) and PP stage. ``unsupported_reason`` names anything else (TE
layers, MoE, MLA, sequence parallelism, attention sinks, ...), and the engine then uses the megatron
forward. A model trained with sequence parallelism decodes here all the same: the engine switches SP
off for its decoding (``model.build.sequence_parallel_disabled``). Equality with that forward is tested to fp32 rounding at TP=1/2 and PP=2.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import Tensor

from ..model.quantization import quantization_of


def _plain_linear(module) -> bool:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return type(module) in (ColumnParallelLinear, RowParallelLinear)


def unsupported_reason(model) -> Optional[str]:
    """Why ``FusedDecodeForward`` cannot run ``model`` (None when it can)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    cfg = model.config
    checks = [
        (getattr(model, "position_embedding_type", None) != "rope", "position embedding is not RoPE"),
        (cfg.sequence_parallel, "sequence parallelism"),
        (cfg.context_parallel_size != 1, "context parallelism"),
        (cfg.num_moe_experts is not None, "mixture of experts"),
        (quantization_of(model) is not None, f"ModelOpt {quantization_of(model)} quantization (the quantizers "
                                             f"sit in megatron's linear layers)"),
        (cfg.multi_latent_attention, "multi-latent attention"),
        (cfg.apply_residual_connection_post_layernorm, "residual after the layernorm"),
        (cfg.fp32_residual_connection, "fp32 residual connection"),
        (cfg.apply_query_key_layer_scaling, "query-key layer scaling"),
        (getattr(cfg, "softmax_type", "vanilla") != "vanilla", "attention sink softmax"),
        (getattr(cfg, "attention_output_gate", False), "attention output gate"),
        (cfg.rotary_interleaved, "interleaved RoPE"),
        (getattr(cfg, "use_mup", False), "muP logit scaling"),
        (getattr(cfg, "activation_func_clamp_value", None) is not None, "clamped GLU"),
        (cfg.num_query_groups < parallel_state.get_tensor_model_parallel_world_size(),
         "fewer query groups than TP ranks"),
    ]
    for failed, reason in checks:
        if failed:
            return reason
    for layer in model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        if not isinstance(attention, SelfAttention) or type(mlp) is not MLP:
            return f"layer {layer.layer_number} is not self-attention + dense MLP"
        if not all(_plain_linear(m) for m in (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1,
                                              mlp.linear_fc2)):
            return f"layer {layer.layer_number} has non-megatron-local linears (Transformer Engine?)"
        if getattr(attention, "_yarn_concentration_factor", None) not in (None, 1.0):
            return "YaRN attention scaling"
        if not hasattr(attention.core_attention, "softmax_scale"):
            return "core attention without a softmax_scale"
    if model.post_process and model.output_layer is not None and not _plain_linear(model.output_layer):
        return "output layer is not a megatron-local ColumnParallelLinear"
    return None


# Below this many rows a CPU projection runs as ``weight @ x.T``: MKL's sgemm packs the weight
# operand of ``x @ weight.T`` (one more pass over memory), which at decoding's 1-64 rows makes it
# ~2.5x slower than the transposed product; from ~128 rows on both cost the same (BENCHMARKS.md).
SMALL_CPU_ROWS = 96


def project(x: Tensor, weight: Tensor) -> Tensor:
    """``x [..., in] @ weight[out, in].T`` (``F.linear`` without bias), the fastest way for its size."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or rows > SMALL_CPU_ROWS or rows == 0:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    return torch.mm(weight, flat.t()).t().reshape(*x.shape[:-1], weight.shape[0])


def _linear(x: Tensor, module) -> Tensor:
    out = project(x, module.weight)
    return out if module.bias is None else out + module.bias


class FusedDecodeForward:
    """This rank's pipeline stage of ``model`` as an inference-only function (see the module doc)."""

    def __init__(self, model) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fused decoding forward does not support this model: {reason}")
        self.model = model
        self.config = model.config
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if self.tp > 1 else None
        self.layers = list(model.decoder.layers)
        first = self.layers[0].self_attention if self.layers else None
        self.heads = first.num_attention_heads_per_partition if first else 0
        self.groups = first.num_query_groups_per_partition if first else 0
        self.head_dim = first.hidden_size_per_attention_head if first else 0

    def _row_parallel(self, x: Tensor, module) -> Tensor:
        out = project(x, module.weight)
        if self.tp_group is not None:
            torch.distributed.all_reduce(out, group=self.tp_group)
        return out if module.bias is None else out + module.bias  # the bias is added once, after the sum

    def _rope(self, position_ids: Tensor, dtype: torch.dtype):
        """cos/sin ``[S, B, 1, rot]`` for all layers of this forward (megatron rebuilds them per layer)."""
        freqs = self.model._rope_table(position_ids.device)[position_ids.t()].squeeze(2)
        return freqs.shape[-1], torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)

    @staticmethod
    def _rotate(t: Tensor, rot: int, cos: Tensor, sin: Tensor) -> Tensor:
        # megatron's _apply_rotary_pos_emb_bshd (non-interleaved), with cos/sin computed once
        part, rest = t[..., :rot], t[..., rot:]
        half = rot // 2
        rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
        out = part * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                 columns: Optional[Tensor] = None, hidden: Optional[Tensor] = None, cache=None) -> Tensor:
        """``attention_mask`` ``[B, 1, Sq, Sk]`` bool (True = masked), keys = cached columns then the
        queries. Returns vocab-parallel logits ``[B, K, V/TP]`` of ``columns`` ``[B, K]`` (all
        columns when None) on the last stage, the hidden states ``[S, B, H]`` on other stages.
        ``hidden`` is the previous stage's output (pipeline stages after the first)."""
        model = self.model
        if model.pre_process:
            hidden = model.embedding(input_ids=input_ids, position_ids=position_ids)
        elif hidden is None:
            raise ValueError("a pipeline stage after the first needs the previous stage's hidden states")
        dtype = hidden.dtype
        sq, batch = hidden.shape[0], hidden.shape[1]
        rot, cos, sin = self._rope(position_ids, dtype)
        # additive mask; finfo.min (not -inf) keeps fully masked rows (padding queries) finite
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=hidden.device)
        bias.masked_fill_(attention_mask, torch.finfo(dtype).min)
        q_width = self.heads // self.groups * self.head_dim
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attention, layer.mlp
            x = layer.input_layernorm(hidden)
            qkv = _linear(x, attention.linear_qkv).view(sq, batch, self.groups, q_width + 2 * self.head_dim)
            query, key, value = torch.split(qkv, [q_width, self.head_dim, self.head_dim], dim=3)
            query = query.reshape(sq, batch, self.heads, self.head_dim)
            if attention.q_layernorm is not None:
                query = attention.q_layernorm(query)
            if attention.k_layernorm is not None:
                key = attention.k_layernorm(key)
            query = self._rotate(query, rot, cos, sin)
            key = self._rotate(key, rot, cos, sin)
            if cache is not None:
                key, value = cache.extend(index, key, value)
            # [s, b, h, d] -> [b, h, s, d]
            out = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), attn_mask=bias,
                scale=attention.core_attention.softmax_scale, enable_gqa=self.heads != self.groups,
            )
            out = out.permute(2, 0, 1, 3).reshape(sq, batch, self.heads * self.head_dim)
            hidden = hidden + self._row_parallel(out, attention.linear_proj)
            x = _linear(layer.pre_mlp_layernorm(hidden), mlp.linear_fc1)
            if self.config.gated_linear_unit:
                gate, up = torch.chunk(x, 2, dim=-1)
                x = self.config.activation_func(gate) * (up + self.config.glu_linear_offset
                                                         if self.config.glu_linear_offset else up)
            else:
                x = self.config.activation_func(x)
            hidden = hidden + self._row_parallel(x, mlp.linear_fc2)
        if not model.post_process:
            return hidden
        if model.decoder.final_layernorm is not None:
            hidden = model.decoder.final_layernorm(hidden)
        if columns is not None:
            hidden = hidden.gather(0, columns.t()[..., None].expand(-1, -1, hidden.shape[-1]))
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
            else model.output_layer.weight
        return project(hidden, weight).transpose(0, 1)

