"""``opdlm-plan``: check a training config and parallel layout, and estimate memory per GPU, without a GPU.

    opdlm-plan --config configs/smollm2_opd.yaml --world-size 8 --gpu-memory-gb 80 [key=value ...]

Checks (each one line naming the bad value): the world size against TP x PP, the model against the
layout (heads, query groups, FFN, layers, vocabulary padding: ``ModelConfig.check_parallel``), the
batch against data parallelism, the objective's settings (``TrainConfig``) and FP8 settings.

Memory of the most loaded rank (pipeline stage 0 holds the embedding and the most activations):

* student weights, fp32 main gradients (megatron DDP's ``grad_reduce_in_fp32``), Adam moments and fp32
  master weights for 16-bit parameters, divided over data-parallel ranks with the distributed optimizer;
* teacher weights in its dtype (1 byte per parameter with ``fp8_param``);
* the teacher's targets for one step's rows (packed logits of the supervised positions, or top-k);
* the rollout's KV cache: this rank's share of ``tasks_per_rollout`` rows, prompt + final curriculum
  length, its layers and KV heads;
* activations of the ``[prompt | x0 | xt]`` layout at the final length (P + 2A columns, every answer
  token supervised): the tensors the student's layers keep for backward (``activations.py``), with
  megatron-LM's pipeline rule, with or without sequence parallelism (``parallel.sequence_parallel``);
  megatron-LM's own formula (``theoretical_memory_usage.compute_activation_memory[_without_sp]``) is
  printed as a note beside it.

The static parts are exact tensor sizes (checked against the tensors a built trainer holds, in
tests/test_plan.py), the activation count is held to the bytes a real student keeps (within 15%,
on CPU). A layout that does not fit gets suggestions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config.model import ACTIVATIONS, ModelConfig
from ..objectives import get_objective
from ..training.config import TrainConfig
from .activations import ActivationShape, activation_bytes

GIB = 1024 ** 3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    parts: Dict[str, float] = field(default_factory=dict)  # bytes on the most loaded rank
    context_parallel: int = 1
    expert_parallel: int = 1
    notes: List[str] = field(default_factory=list)
    flex_activations: Optional[float] = None  # the activations with FlexAttention, for a dense-attention plan
    sequence_parallel_activations: Optional[float] = None  # the activations with SP, for a TP > 1 plan without
    doubled_context_parallel_activations: Optional[float] = None  # the activations at twice the CP size

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def expert_parameters_per_layer(config: ModelConfig) -> int:
    """The weights of one layer's experts (all of them; 0 for a dense model)."""
    if config.num_experts is None:
        return 0
    gated = 2 if ACTIVATIONS[config.activation][1] else 1
    return config.num_experts * config.expert_ffn_hidden_size * config.hidden_size * (gated + 1)


def stage_expert_parameters(config: ModelConfig, pp: int, ep: int) -> int:
    """The expert weights among the first stage's parameters (1/EP of each of its layers' experts;
    0 for a dense model), before the tensor-parallel split."""
    return math.ceil(config.num_layers / pp) * expert_parameters_per_layer(config) // ep


def stage_parameters(config: ModelConfig, tp: int, pp: int, ep: int = 1) -> int:
    """Parameters held by the first pipeline stage's rank (embedding + its layers; with one stage
    also the final norm and, untied, the output layer), per tensor-parallel rank; a mixture of
    experts holds 1/EP of each layer's experts (``stage_expert_parameters``)."""
    total = config.num_parameters()
    vocab_rows = config.padded_vocab_size(tp) * config.hidden_size
    layers = total - vocab_rows * (1 if config.tie_word_embeddings else 2) - config.hidden_size
    per_layer = layers // config.num_layers - expert_parameters_per_layer(config)
    held = math.ceil(config.num_layers / pp) * per_layer + vocab_rows  # the embedding
    if pp == 1:
        held += config.hidden_size + (0 if config.tie_word_embeddings else vocab_rows)
    return math.ceil((held + stage_expert_parameters(config, pp, ep)) / tp)


def plan(cfg: TrainConfig, config: ModelConfig, world_size: int, teacher: Optional[ModelConfig] = None,
         distributed_optimizer: Optional[bool] = None, prompt_tokens: Optional[int] = None) -> Plan:
    """Checks the layout and estimates memory per GPU (bytes). Raises ValueError naming a bad value."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    cp = cfg.parallel.context_parallel_size
    ep = cfg.parallel.expert_model_parallel_size
    if world_size < 1 or world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not a multiple of TP {tp} x PP {pp}"
                         + (f" x CP {cp}" if cp > 1 else ""))
    if world_size % (tp * ep * pp):
        raise ValueError(f"world size {world_size} is not a multiple of TP {tp} x EP {ep} x PP {pp} (the experts' "
                         f"layout)")
    if config.num_layers % pp:
        raise ValueError(f"num_layers {config.num_layers} is not divisible by pipeline parallel size {pp}")
    config.check_parallel(tp, pp, ep)
    for who, precision in (("model.student_precision", cfg.model.student_precision),
                           ("model.teacher_precision", cfg.model.teacher_precision)):
        if precision.enabled and config.transformer_impl != "transformer_engine":
            raise ValueError(f"{who} asks for FP8, which needs the Transformer Engine layer spec; the checkpoint has "
                             f"transformer_impl {config.transformer_impl!r} (convert with --transformer-impl "
                             f"transformer_engine)")
    dp = world_size // (tp * pp * cp)
    micro, batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if batch % (dp * micro):
        raise ValueError(f"train.global_batch_size {batch} is not a multiple of data-parallel size {dp} x "
                         f"train.micro_batch_size {micro}")
    if distributed_optimizer is None:
        distributed_optimizer = cfg.parallel.distributed_optimizer == "on" or (
            cfg.parallel.distributed_optimizer == "auto" and dp * cp > 1 and cfg.parallel.device != "cpu")
    out = Plan(world_size, tp, pp, dp, context_parallel=cp, expert_parallel=ep)

    # student: weights + fp32 main grads + Adam (+ fp32 master weights for 16-bit parameters)
    params = stage_parameters(config, tp, pp, ep)
    dtype_bytes = BYTES[config.params_dtype]
    optimizer_bytes = 8 + (4 if dtype_bytes < 4 else 0)
    out.parts["student weights"] = params * dtype_bytes
    out.parts["student gradients (fp32)"] = params * 4
    # megatron shards the dense weights' state over DP x CP, the experts' over the expert data-parallel
    # ranks (world / (TP x EP x PP): the ranks that hold the same experts)
    expert_dp = world_size // (tp * ep * pp)
    experts = stage_expert_parameters(config, pp, ep) / tp
    sharded = (params - experts) / (dp * cp) + experts / expert_dp
    out.parts["optimizer (Adam" + (", distributed)" if distributed_optimizer else ")")] = \
        (sharded if distributed_optimizer else params) * optimizer_bytes

    # teacher (self-distillation: the student's architecture)
    if cfg.objective not in ("mdlm", "ar"):
        teacher = teacher or config
        teacher_dtype = cfg.model.teacher_dtype or teacher.params_dtype
        per = 1 if cfg.model.teacher_precision.fp8_param else BYTES.get(teacher_dtype, 4)
        out.parts["teacher weights"] = stage_parameters(teacher, tp, pp, ep if teacher.num_experts else 1) * per

    # lengths at the end of the curriculum
    answer = cfg.curriculum.max_length
    prompt = prompt_tokens or cfg.data.max_prompt_tokens
    if prompt + answer > config.max_sequence_length:
        out.notes.append(f"prompt {prompt} + final rollout length {answer} exceed max_sequence_length "
                         f"{config.max_sequence_length}: rollouts will be cut to fit")
        answer = max(config.block_size, config.max_sequence_length - prompt)
    rows = batch // dp
    vocab = config.padded_vocab_size(tp) // tp
    # all_rounds: an answer is up to block_size rows (one per round), and round r of a block masks at most
    # block_size - r of its slots, so the student's loss sees at most (block_size + 1) / 2 x its tokens
    all_rounds = cfg.objective in ("opd", "opd_tcs") and cfg.loss.state_selection == "all_rounds"
    # loss.pack_states: those rows become one row [prompt | x0 | xt_1 .. xt_R] per answer
    packed = all_rounds and cfg.loss.pack_states
    rows_per_answer = config.block_size if all_rounds and not packed else 1
    supervised_per_answer = answer * (config.block_size + 1) / 2 if all_rounds else answer
    if packed:
        out.notes.append(f"loss.state_selection all_rounds, packed (loss.pack_states): one row of up to "
                         f"{config.block_size} xt copies per answer; a micro-batch of {micro} answers is {micro} rows")
    elif all_rounds:
        out.notes.append(f"loss.state_selection all_rounds: up to {rows_per_answer} rows per answer (one per round); "
                         f"a micro-batch of {micro} answers holds up to {micro * rows_per_answer} rows")
    if cfg.objective not in ("mdlm", "ar", "sft"):
        # the teacher scores each answer once, whatever its rows: at most every answer token
        supervised = rows * answer
        k = cfg.loss.top_k
        out.parts["teacher targets (one step)"] = supervised * (k * 12 if k else vocab * 4)
    if cfg.objective in ("opd", "opd_tcs"):
        rollout_rows = math.ceil(cfg.rollout.tasks_per_rollout / dp)
        layers = math.ceil(config.num_layers / pp)
        kv_heads = config.query_groups // tp
        out.parts["rollout KV cache"] = (rollout_rows * (prompt + answer) * layers * 2 * kv_heads
                                         * config.head_dim * dtype_bytes)

    # activations of [prompt | x0 | xt]: what the student's layers keep for backward (activations.py),
    # the worst case of every answer token supervised
    seq = prompt + 2 * answer if cfg.objective not in ("ar", "sft") else prompt + answer
    if packed:
        seq = prompt + (1 + config.block_size) * answer
    distill = get_objective(cfg.objective).distill  # else the targets are token ids (cross entropy)
    micro_rows = micro * rows_per_answer
    sequence_parallel = cfg.parallel.sequence_parallel and tp > 1
    shape = ActivationShape(seq, micro_rows, int(micro * supervised_per_answer) // cp, tp,
                            cfg.loss.top_k if distill else None, distill, sequence_parallel, cp)
    microbatches = max(1, rows // micro)
    name = (f"activations ({seq} columns x {micro_rows} rows, {config.attention_backend} attention"
            f"{', sequence parallel' if sequence_parallel else ''}{f', CP {cp}' if cp > 1 else ''})")
    out.parts[name] = activation_bytes(config, shape, pp, microbatches)
    if config.num_experts is not None and ep > 1:
        # one layer's all-to-all at a time: the k routed copies of this rank's tokens sent and received
        out.parts["MoE all-to-all buffers (one layer)"] = (2 * config.moe_router_topk * seq * micro_rows // cp
                                                          * config.hidden_size * dtype_bytes)
    if config.attention_backend == "dense":
        out.flex_activations = activation_bytes(config.replace(attention_backend="flex"), shape, pp, microbatches)
    if tp > 1 and not sequence_parallel:
        out.sequence_parallel_activations = activation_bytes(
            config, dataclasses.replace(shape, sequence_parallel=True), pp, microbatches)
    out.doubled_context_parallel_activations = activation_bytes(
        config, dataclasses.replace(shape, context_parallel=2 * cp, supervised_tokens=shape.supervised_tokens // 2),
        pp, microbatches)
    megatron = _megatron_activation_estimate(config, seq // cp, micro_rows, tp, pp, microbatches, sequence_parallel)
    out.notes.append(f"megatron-LM's activation formula (4h GeLU MLP, 16-bit, flash attention, logits at every "
                     f"column) would say {megatron / GIB:.2f} GiB")
    return out


def _megatron_activation_estimate(config: ModelConfig, seq: int, micro: int, tp: int, pp: int,
                                  num_microbatches: int, sequence_parallel: bool = False) -> float:
    from megatron.training.theoretical_memory_usage import (compute_activation_memory,
                                                            compute_activation_memory_without_sp)

    args = Namespace(hidden_size=config.hidden_size, micro_batch_size=micro, num_layers=config.num_layers,
                     padded_vocab_size=config.padded_vocab_size(tp), pipeline_model_parallel_size=pp,
                     seq_length=seq, tensor_model_parallel_size=tp, virtual_pipeline_model_parallel_size=None,
                     ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads)
    if sequence_parallel:  # megatron's table-2 formula with SP (and selective recompute of attention)
        return compute_activation_memory(args, num_microbatches=num_microbatches)
    return compute_activation_memory_without_sp(args, num_microbatches=num_microbatches)


def suggestions(p: Plan, cfg: TrainConfig, config: ModelConfig, budget: float) -> List[str]:
    tips = []
    if p.flex_activations is not None and cfg.parallel.device != "cpu":
        dense = next(v for k, v in p.parts.items() if k.startswith("activations"))
        tips.append(f"FlexAttention for the student (model.attention_backend: flex, GPU only) keeps no score "
                    f"tensor per head: activations {dense / GIB:.1f} -> {p.flex_activations / GIB:.1f} GiB")
    if p.sequence_parallel_activations is not None:
        dense = next(v for k, v in p.parts.items() if k.startswith("activations"))
        tips.append(f"sequence parallelism (parallel.sequence_parallel: true) splits the norms' and linear inputs' "
                    f"activations over TP: activations {dense / GIB:.1f} -> {p.sequence_parallel_activations / GIB:.1f} GiB")
    if p.doubled_context_parallel_activations is not None:
        dense = next(v for k, v in p.parts.items() if k.startswith("activations"))
        tips.append(f"context parallelism (parallel.context_parallel_size: {2 * p.context_parallel}) splits every row's "
                    f"columns over more ranks: activations {dense / GIB:.1f} -> "
                    f"{p.doubled_context_parallel_activations / GIB:.1f} GiB")
    more_ep = 2 * p.expert_parallel
    if config.num_experts is not None and config.num_experts % more_ep == 0 and \
            p.world_size % (p.tensor_parallel * more_ep * p.pipeline_parallel) == 0:
        tips.append(f"more expert parallelism (parallel.expert_model_parallel_size: {more_ep}) halves the experts "
                    f"each rank holds, with their gradients and optimizer state")
    if config.num_experts is None and config.num_attention_heads % (p.tensor_parallel * 2) == 0 and \
            config.query_groups % (p.tensor_parallel * 2) == 0:
        tips.append(f"more tensor parallelism (TP {p.tensor_parallel * 2}) halves weights, caches and activations")
    if config.num_layers % (p.pipeline_parallel * 2) == 0:
        tips.append(f"more pipeline parallelism (PP {p.pipeline_parallel * 2}) halves the per-stage layers")
    if not cfg.model.teacher_precision.fp8_param and "teacher weights" in p.parts:
        tips.append("an FP8 teacher (model.teacher_precision: {fp8: e4m3, fp8_param: true}) halves its weights")
    if cfg.loss.top_k is None and "teacher targets (one step)" in p.parts:
        tips.append("top-k teacher targets (loss.top_k: 64) replace full-vocabulary logits")
    if p.data_parallel > 1:
        tips.append("the distributed optimizer shards Adam over data-parallel ranks (parallel.distributed_optimizer: on)")
    return tips


def format_plan(p: Plan, budget: Optional[float]) -> str:
    lines = [f"layout: world {p.world_size} = TP {p.tensor_parallel} x PP {p.pipeline_parallel}"
             + (f" x CP {p.context_parallel}" if p.context_parallel > 1 else "") + f" x DP {p.data_parallel}"
             + (f" (experts: EP {p.expert_parallel} x expert DP "
                f"{p.world_size // (p.tensor_parallel * p.expert_parallel * p.pipeline_parallel)})"
                if p.expert_parallel > 1 else ""),
             "memory of the most loaded rank:"]
    width = max(len(name) for name in [*p.parts, "total"])
    for name, value in p.parts.items():
        lines.append(f"  {name:<{width}} {value / GIB:9.3f} GiB")
    lines.append(f"  {'total':<{width}} {p.total / GIB:9.3f} GiB" + (f" of {budget / GIB:.0f} GiB" if budget else ""))
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def load_architecture(path: str, needs_transformer_engine: bool = False) -> Tuple[ModelConfig, Optional[str]]:
    """The architecture at ``path``: this project's checkpoint or ``opdlm_model_config.json``, or a HF
    ``config.json`` (or the HF model directory holding it, tokenizer included), mapped as
    ``opdlm-convert-hf-to-megatron`` would convert it - with the Transformer Engine spec when the run
    needs it (FP8). Returns ``(config, note)``; the note says how a HF config was read."""
    from ..config.model import CONFIG_FILE_NAME
    from ..tools.hf_io import read_json_object, read_tokenizer_info
    from ..tools.hf_mapping import model_config_from_hf

    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE_NAME)) or os.path.basename(path) == CONFIG_FILE_NAME:
        return ModelConfig.load(path), None
    hf_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(hf_file):
        raise FileNotFoundError(f"no model config at {path} (an opdlm checkpoint, its {CONFIG_FILE_NAME}, or a HF "
                                f"config.json or model directory)")
    hf = read_json_object(hf_file)
    generation_file = os.path.join(directory, "generation_config.json")
    generation = read_json_object(generation_file) if os.path.isfile(generation_file) else None
    tokenizer_size, tokenizer_mask = read_tokenizer_info(directory) if os.path.isdir(path) else (None, None)
    overrides = {"transformer_impl": "transformer_engine"} if needs_transformer_engine else {}
    config = model_config_from_hf(hf, generation, tokenizer_size=tokenizer_size,
                                  tokenizer_mask_token_id=tokenizer_mask, **overrides)
    note = (f"architecture from the HF config {hf_file}, as opdlm-convert-hf-to-megatron converts it"
            + (" with --transformer-impl transformer_engine (FP8 needs it)" if needs_transformer_engine else ""))
    return config, note
