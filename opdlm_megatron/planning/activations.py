"""Activation memory of the student's training forward: what its layers keep for backward.

Megatron-LM's ``theoretical_memory_usage`` formula (Korthikanti et al., table 2) assumes a 4h GeLU
MLP, 16-bit activations, flash attention (no score matrix) and logits over the whole sequence. The
OPD student differs on each count: SwiGLU MLPs, grouped-query attention, fp32 or 16-bit students, an
arbitrary ``[prompt | x0 | xt]`` mask (unfused dense attention keeps the softmax probabilities of every
head, ``heads x seq`` per token), and logits only at the supervised columns. So the planner counts the
tensors each part of the layers this project builds keeps (bytes per token, per tensor-parallel rank,
with or without sequence parallelism), the way megatron's formula does for its model, and keeps megatron's
pipeline rule (stage 0 holds ``min(micro-batches, PP)`` micro-batches in flight under 1F1B).

Per layer, ``p`` bytes per parameter-dtype element, ``h`` hidden, ``q``/``kv`` the query and
key/value widths of this rank (heads x head_dim), ``f`` the FFN width of this rank:

* norms: megatron's local spec runs torch's norms; RMSNorm computes in fp32 and keeps its fp32 input
  and normalised output (8h bytes), LayerNorm keeps its input (p h); Transformer Engine's fused
  norm + linear keeps the input and the normalised output (2 p h);
* linear inputs: QKV and FC1 take the full hidden (p h each, the local spec), the output projection
  the attention output (p q), FC2 the activation output (p f);
* attention, dense (``attention_backend: dense``): q and K/V expanded to every query head for the
  batched matmuls (3 p q), the fp32 softmax probabilities (4 heads x seq) plus their p-dtype copy for
  the matmul with V in 16-bit; RoPE keeps cos/sin of q and k (4 p head_dim); QK-norm two norms more.
  A saved view of the fused QKV output keeps all of it (p (q + 2 kv)): V when it is not repeated
  (as many groups as heads), k's QK-norm input when the norm keeps its input as it is;
* attention, flex: q, K/V at their own width (p (q + 2 kv)), the fp32 log-sum-exp (4 heads);
* MLP: gated (SwiGLU/GeGLU): FC1's output (2 p f) and the activation's three f-wide tensors; else
  FC1's output and the activation output (2 p f);
* mixture of experts (dropless, top-k of E experts of width f_e): each token runs through k experts, so
  the MLP's tensors above at f_e, k times, plus the k dispatched copies of its input (the experts' FC1
  inputs, p h each) and of the experts' outputs that the combine weights by the gates (p h each), and
  the router's input (p h) and fp32 logits and gates (8 E);
* after the last layer (on the last stage): the final norm, the hidden state gathered at the
  supervised columns (p h), the student's logits there (p V/TP) and the micro-batch's copy of the
  teacher's targets (4 V/TP, or 12 k with top-k targets; 8 for a token id), per supervised token.

tests/test_plan.py measures the bytes the real megatron-core student keeps for backward (autograd's
saved-tensor hooks, parameters excluded, each storage once) on CPU and holds this count to them
within 15%. The Transformer Engine counts are from TE's modules and wait for a GPU measurement
(tests/test_gpu.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config.model import ACTIVATIONS, ModelConfig


@dataclass(frozen=True)
class ActivationShape:
    """One micro-batch of the student's training forward on one rank."""

    seq_length: int  # columns of the layout ([prompt | x0 | xt]: P + 2A)
    micro_batch_size: int
    supervised_tokens: int  # per micro-batch (all rows), the positions whose logits enter the loss
    tensor_parallel: int = 1
    target_top_k: Optional[int] = None  # None: full-vocabulary teacher targets
    distill: bool = True  # False: cross-entropy objectives, whose targets are token ids
    sequence_parallel: bool = False  # megatron's SP (with TP > 1): norms and linear inputs split over TP
    context_parallel: int = 1  # CP ranks: each holds seq_length / CP columns and gathers every key and value


def _norm_bytes(config: ModelConfig, p: int, width: int) -> float:
    if config.transformer_impl == "transformer_engine":
        return 2 * p * width
    if config.normalization == "RMSNorm":
        return 8 * width  # fp32 input (or the input itself, fp32) + fp32 normalised output
    return p * width


def layer_bytes_per_token(config: ModelConfig, seq_length: int, tp: int = 1, sequence_parallel: bool = False,
                          cp: int = 1) -> float:
    """Bytes one transformer layer keeps for backward, per token of the micro-batch (with context
    parallelism: per token this rank holds; ``seq_length`` is the whole row). With sequence
    parallelism the tensors outside attention and MLP (the norms', and QKV's and FC1's inputs, which
    megatron keeps as this rank's sequence share and gathers again in backward) are 1/TP of them.
    With CP the attention keeps the keys and values gathered from every CP rank: CP per own token."""
    p = config.torch_dtype.itemsize
    h, d = config.hidden_size, config.head_dim
    heads, groups = config.num_attention_heads // tp, config.query_groups // tp
    q_width, kv_width = heads * d, groups * d
    ffn = config.ffn_hidden_size // tp
    outside_tp = 2 * _norm_bytes(config, p, h)  # input norm, pre-MLP norm
    outside_tp += 2 * p * h  # QKV and FC1 inputs
    total = outside_tp / tp if sequence_parallel else outside_tp
    total += 4 * p * d  # RoPE cos/sin of q and k
    fused_qkv = p * (q_width + 2 * kv_width)  # the QKV projection's output
    # a saved view of the fused QKV output keeps all of it: k's QK-norm input where the norm keeps its
    # input as it is (fp32 RMSNorm, LayerNorm), V where it is not repeated (as many groups as heads)
    keeps_input = config.transformer_impl == "local" and (config.normalization == "LayerNorm" or p == 4)
    k_norm_view = config.qk_layernorm and keeps_input
    if config.qk_layernorm:
        total += _norm_bytes(config, p, q_width) + _norm_bytes(config, p, kv_width)
    if config.attention_backend == "flex":
        total += p * (q_width + 2 * kv_width * cp) + 4 * heads
    else:
        v_view = groups == heads
        total += p * q_width * (1 + cp * (2 - int(v_view)))  # q, and K/V (all CP ranks') repeated to every head
        total += heads * seq_length * (4 + (p if p < 4 else 0))  # fp32 softmax (+ its 16-bit copy)
        if cp > 1:  # V is the gathered tensor, not a view of this rank's QKV output
            total += p * kv_width * cp * int(v_view) + (fused_qkv - p * kv_width if k_norm_view else 0)
        elif v_view or k_norm_view:
            total += fused_qkv - (p * kv_width if k_norm_view else 0)
    total += p * q_width  # the output projection's input
    gated = ACTIVATIONS[config.activation][1]
    if config.num_experts is None:
        total += p * ffn * (5 if gated else 2)
    else:
        k, expert_ffn = config.moe_router_topk, config.expert_ffn_hidden_size
        total += k * p * (2 * h + expert_ffn * (5 if gated else 2)) + p * h + 8 * config.num_experts
    return total


def activation_bytes(config: ModelConfig, shape: ActivationShape, pipeline_parallel: int = 1,
                     num_microbatches: int = 1) -> float:
    """Activation bytes on pipeline stage 0 (the most loaded: it holds the most micro-batches in flight)."""
    p = config.torch_dtype.itemsize
    cp = shape.context_parallel
    tokens = shape.seq_length * shape.micro_batch_size // cp  # this rank's columns
    layers = math.ceil(config.num_layers / pipeline_parallel)
    sp = shape.sequence_parallel and shape.tensor_parallel > 1
    per_microbatch = layers * tokens * layer_bytes_per_token(config, shape.seq_length, shape.tensor_parallel, sp, cp)
    per_microbatch += 8 * tokens  # input ids
    if config.attention_backend != "flex":
        per_microbatch += shape.micro_batch_size * shape.seq_length ** 2 // cp  # the bool mask (own rows), shared
    if pipeline_parallel == 1:  # stage 0 is also the last stage: final norm, logits, targets
        vocab = config.padded_vocab_size(shape.tensor_parallel) // shape.tensor_parallel
        target = (12 * shape.target_top_k if shape.target_top_k else 4 * vocab) if shape.distill else 8
        per_microbatch += tokens * _norm_bytes(config, p, config.hidden_size) / (shape.tensor_parallel if sp else 1)
        per_microbatch += shape.supervised_tokens * (p * config.hidden_size + p * vocab + target)
    in_flight = min(num_microbatches, pipeline_parallel) if pipeline_parallel > 1 else 1
    return per_microbatch * in_flight


def saved_activation_bytes(model, forward_and_loss) -> int:
    """What the count above is held to: the bytes autograd keeps for backward while
    ``forward_and_loss()`` (a forward of ``model`` and its scalar loss) runs - every saved tensor's
    storage once, ``model``'s parameters excluded; the loss is then back-propagated (a real training
    graph). Used by tests/test_plan.py and benchmarks/long_context.py."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward_and_loss()
    loss.backward()
    return sum(storages.values())

