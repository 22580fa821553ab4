"""Student and teacher GPTModels from one ``ModelConfig``.

Both are megatron-core ``GPTModel``s built from the stock local or Transformer Engine layer spec,
with two changes made through the spec and a subclass rather than a fork:

* self-attention takes an explicit mask (``AttnMaskType.arbitrary``; the student's block-causal /
  OPD layouts and the teacher's padded causal mask both come from ``masks.py``), optionally through
  ``FlexCoreAttention`` (``attention_backend="flex"``);
* RoPE follows the ``position_ids`` given to ``forward`` (``OPDGPTModel``): megatron's GPTModel
  rotates by column index, but OPDLM needs per-row positions (left-padded batches) and the xt copy
  of an answer sharing positions with x0.

The student and the teacher have the same architecture and the same (padded) vocabulary, including
the ``[MASK]`` row, so that their vocab-parallel logits line up shard for shard.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from ..config.model import ModelConfig
from ..config.precision import PrecisionConfig, check_fp8_runtime, fp8_sequence_multiple, pad_batch
from ..runtime.platform import compute_device
from . import vocab_parallel as vp
from .attention import FlexCoreAttention
from .context_parallel import keys_gathered
from .expert_parallel import expert_parallel_max, idle_microbatch
from .masks import AttentionLayout, right_padded
from .microbatches import microbatch_rows
from .norm import SequenceParallelTorchNorm, with_sequence_parallel_norms
from .quantization import checkpoint_sharded_state, insert_quantizers

ROLES = ("student", "teacher")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class OPDGPTModel(GPTModel):
    """GPTModel whose rotary embedding is indexed by ``position_ids`` ``[B, S]``."""

    def _rope_table(self, device: torch.device) -> Tensor:
        table = getattr(self, "_opd_rope_table", None)
        if table is None or table.device != device:
            # [max_len, 1, 1, dim] in fp32, built by megatron's RotaryEmbedding (incl. its scaling)
            table = self.rotary_pos_emb.get_emb(self.max_sequence_length).to(device)
            self._opd_rope_table = table
        return table

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's, as every checkpoint holds it (the project's, Megatron-LM's): for a quantized student,
        ModelOpt's state as tensors only (``quantization.checkpoint_sharded_state``)."""
        return checkpoint_sharded_state(self, super().sharded_state_dict(prefix, sharded_offsets, metadata))

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        outputs = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if self.position_embedding_type != "rope" or position_ids is None:
            return outputs
        table = self._rope_table(position_ids.device)
        if position_ids.numel() and int(position_ids.max()) >= table.shape[0]:
            raise ValueError(
                f"position id {int(position_ids.max())} exceeds max_sequence_length {table.shape[0]}"
            )
        # [B, S] -> [S, B, 1, dim]; megatron's RoPE broadcasts over heads and accepts per-row freqs
        rotary = table[position_ids.t()].squeeze(2)
        return (outputs[0], rotary, *outputs[2:])


class _DropGPTModelDeprecation(logging.Filter):
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" on every GPTModel build.
    The project stays on GPTModel on purpose (README, Architecture: HybridModel's forward has no
    output processor and no per-row RoPE hook), so the notice is dropped for our builds only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GPTModel IS DEPRECATED" not in record.getMessage()


@contextlib.contextmanager
def _quiet_gpt_model_notice():
    target = logging.getLogger("megatron.core.models.gpt.gpt_model")
    notice = _DropGPTModelDeprecation()
    target.addFilter(notice)
    try:
        yield
    finally:
        target.removeFilter(notice)


def layer_spec(config: ModelConfig, attn_mask_type: AttnMaskType = AttnMaskType.arbitrary,
               context_parallel: bool = False) -> ModuleSpec:
    """The stock megatron-core layer spec with our attention-mask handling plugged in; with
    ``context_parallel`` its core attention gathers keys and values over the CP group in the
    training forward (``context_parallel.py``)."""
    if config.transformer_impl == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm,
                                        num_experts=config.num_experts, moe_grouped_gemm=False)
    else:
        from megatron.core.extensions.transformer_engine import HAVE_TE

        if not HAVE_TE:
            raise ImportError(
                "transformer_impl='transformer_engine' needs Transformer Engine "
                "(pip install 'opdlm-megatron[te]'); use transformer_impl='local' without it"
            )
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm,
                                                          num_experts=config.num_experts)
    attention = spec.submodules.self_attention
    attention.params = {**attention.params, "attn_mask_type": attn_mask_type}
    if config.attention_backend == "flex":
        attention.submodules.core_attention = FlexCoreAttention
    if context_parallel:
        attention.submodules.core_attention = keys_gathered(attention.submodules.core_attention)
    return spec


def block_spec(config: ModelConfig, transformer_config, attn_mask_type: AttnMaskType = AttnMaskType.arbitrary,
               context_parallel: bool = False):
    """What ``GPTModel`` takes as its layer spec: ``layer_spec`` as it is, or under sequence parallelism
    with megatron's torch norms (its local spec without apex) marked for SP (``norm.py``), the block's
    final norm included."""
    spec = layer_spec(config, attn_mask_type, context_parallel)
    if not transformer_config.sequence_parallel or config.transformer_impl != "local":
        return spec
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    final_norm = transformer_block.LayerNormImpl
    return transformer_block.TransformerBlockSubmodules(
        layer_specs=[with_sequence_parallel_norms(spec)] * transformer_block.get_num_layers_to_build(transformer_config),
        layer_norm=SequenceParallelTorchNorm if final_norm is WrappedTorchNorm else final_norm)


def _rope_kwargs(config: ModelConfig) -> dict:
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    kwargs = dict(rotary_base=config.rotary_base, rotary_percent=config.rotary_percent)
    if rope_type == "linear":
        kwargs["seq_len_interpolation_factor"] = float(scaling["factor"])
    return kwargs


def _apply_llama3_rope_scaling(model: OPDGPTModel, config: ModelConfig) -> None:
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return
    rope = model.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    base = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    rope.inv_freq = rope._apply_scaling(
        base,
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def build_model(
    config: ModelConfig,
    role: str = "student",
    device: Optional[torch.device] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    attn_mask_type: AttnMaskType = AttnMaskType.arbitrary,
    precision: Optional[PrecisionConfig] = None,
    sequence_parallel: bool = False,
    **transformer_overrides,
) -> OPDGPTModel:
    """Builds this rank's part of the student or teacher for the current megatron parallel state.

    ``precision``: its FP8 settings, checked against this machine (one-line errors) and mapped onto
    the TransformerConfig (``precision.py``). ``sequence_parallel``: megatron's sequence parallelism
    (activations outside attention and MLP split over the TP ranks along the sequence; off at TP=1, as
    in Megatron-LM); inputs are then padded to a multiple of TP columns (``sequence_multiple``) and
    rollouts decode outside it (``sequence_parallel_disabled``). The teacher comes back in eval mode
    with gradients off; it never enters an optimizer.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised; call platform.initialize_runtime first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    device = device or compute_device()
    if attn_mask_type == AttnMaskType.causal and config.attention_backend != "dense":
        raise ValueError(f"the causal attention kernel needs attention_backend 'dense', got {config.attention_backend!r}")
    if precision is not None:
        check_fp8_runtime(precision, config.transformer_impl, config.params_dtype, device, role)
        transformer_overrides = {**precision.transformer_overrides(config.num_layers), **transformer_overrides}
    # context parallelism stays 1 in megatron's config: its CP is Transformer Engine's ring attention for
    # causal masks; ours is the attention spec's K/V gather (context_parallel.py), used by the student's
    # training forward only, while every other forward runs whole rows
    transformer_config = config.transformer_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=device.type == "cpu",
        **transformer_overrides,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    with _quiet_gpt_model_notice():
        model = OPDGPTModel(
            config=transformer_config,
            transformer_layer_spec=block_spec(config, transformer_config, attn_mask_type, context_parallel=cp > 1),
            vocab_size=config.padded_vocab_size(tp),
            max_sequence_length=config.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=config.tie_word_embeddings,
            position_embedding_type="rope",
            **_rope_kwargs(config),
        )
    _apply_llama3_rope_scaling(model, config)
    if getattr(model, "rotary_pos_emb", None) is not None:
        # RoPE follows position_ids (OPDGPTModel); megatron's own table, still computed in _preprocess and
        # dropped there, would otherwise be cut into this rank's CP share of a whole-row length
        model.rotary_pos_emb.cp_group = None
    model.to(device=device, dtype=config.torch_dtype)
    model.opd_role = role
    model.opd_attn_mask_type = attn_mask_type
    model.opd_config = config
    if config.quantization is not None:  # a quantized checkpoint's model: its quantizers, ranges to be loaded
        insert_quantizers(model, config.quantization, device.type, config.quantization_exclude)
    if role == "teacher":
        model.eval()
        model.requires_grad_(False)
    return model


def uses_causal_kernel(model) -> bool:
    """Whether ``model`` was built with megatron's causal mask type: its attention makes its own causal
    mask (Transformer Engine: the fused causal kernels) and takes no mask tensor, so it serves causal
    rows whose padding comes after their tokens (right-padded) and nothing else."""
    return getattr(model, "opd_attn_mask_type", AttnMaskType.arbitrary) == AttnMaskType.causal


def attention_mask(config: ModelConfig, queries: AttentionLayout, keys: Optional[AttentionLayout] = None):
    """The mask object the model's attention backend consumes: dense bool (True = masked) or BlockMask."""
    if config.attention_backend == "flex":
        return queries.flex_block_mask(keys)
    return queries.dense_mask(keys)


def mask_unused_vocab(logits: Tensor, config: ModelConfig, exclude_mask_token: bool = True) -> Tensor:
    """Sets the vocab-parallel logits of ids that are not tokens (padded and unused rows; by default
    also [MASK]) to -inf. ``logits`` is this rank's shard ``[..., V / TP]``; returns a new tensor."""
    start, end = vp.vocab_shard_range(config.padded_vocab_size(vp.tp_size()))
    if logits.shape[-1] != end - start:
        raise ValueError(f"logits shard has {logits.shape[-1]} columns, expected {end - start}")
    unused = config.unused_token_mask(start, end, exclude_mask_token).to(logits.device)
    return logits.masked_fill(unused, float("-inf"))


def sequence_multiple(model) -> int:
    """The column multiple ``model``'s inputs are padded to: whole FP8 GEMM tiles with FP8, and
    under sequence parallelism a multiple of TP (megatron splits the sequence evenly over the ranks);
    the padding columns are invalid keys and no loss reads them (``pad_batch``)."""
    multiple = fp8_sequence_multiple(model)
    if getattr(getattr(model, "config", None), "sequence_parallel", False):
        multiple = math.lcm(multiple, parallel_state.get_tensor_model_parallel_world_size())
    return multiple


@contextlib.contextmanager
def sequence_parallel_disabled(model):
    """Runs the block with ``model``'s sequence parallelism off: decoding forwards a few columns at
    a time, which need not split over the TP ranks, and the same weights give the same results with
    SP off. A no-op for a model built without SP.

    The switches are the ones megatron's ``set_model_to_sequence_parallel`` flips (the shared
    config's flag and the modules' ``sequence_parallel`` / ``scatter_to_sequence_parallel`` /
    ``reduce_scatter_embeddings``); it is not called itself because it caches module lists by
    ``id(model)`` for the process's lifetime (a later model at a reused id would get a freed one's
    modules) and restores every attribute to one value rather than to what each was."""
    if not getattr(getattr(model, "config", None), "sequence_parallel", False):
        yield
        return
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if getattr(c, "sequence_parallel", False) is True}
    switched = [(module, name) for module in model.modules() for name in _SEQUENCE_PARALLEL_SWITCHES
                if getattr(module, name, False) is True]
    switched += [(c, "sequence_parallel") for c in configs.values()]
    for owner, name in switched:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for owner, name in switched:
            setattr(owner, name, True)


_SEQUENCE_PARALLEL_SWITCHES = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def _outside_sequence_parallel(output_layer):
    if output_layer is None:
        yield
        return
    output_layer.sequence_parallel = False
    try:
        yield
    finally:
        output_layer.sequence_parallel = True


@dataclass
class ColumnChunks:
    """``select_output_columns`` context for forward-only consumers (the teacher): the columns
    ``[B, K]`` are projected ``chunk`` at a time and each chunk's logits ``[B, k, V/TP]`` go to
    ``consume(start, logits)``, so the logits of all columns never exist at once (at a 152k
    vocabulary, 4,096 columns of fp32 logits are 2.5 GB)."""

    columns: Tensor
    consume: Callable[[int, Tensor], None]
    chunk: int = 1024


def select_output_columns(*, hidden_states: Tensor, output_layer, output_weight, runtime_gather_output, context,
                          scale_logits, **_unused) -> Tensor:
    """A ``GPTModel.forward(output_processor=...)`` that runs the output layer only on the sequence
    columns ``context`` ``[B, K]`` (long) and returns their vocab-parallel logits ``[B, K, V/TP]``
    (or, with a ``ColumnChunks`` context, hands them over chunk by chunk and returns an empty tensor).

    Losses read a few columns of a long input (the xt columns of ``[prompt | x0 | xt]``, the answer
    columns of ``[prompt; answer]``); with a large vocabulary the output layer is a large share of
    the model, so the other columns are never projected.
    """
    sequence_parallel = getattr(output_layer, "sequence_parallel", False)
    if sequence_parallel:
        # this rank holds 1/TP of the sequence: gather it (as megatron's inference path does before
        # slicing). The output layer then runs outside SP, so its input's gradient is all-reduced over
        # TP by the layer itself and the gather's backward only keeps this rank's share of it.
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
    seq, batch, hidden = hidden_states.shape
    chunks = context if isinstance(context, ColumnChunks) else None
    columns = (chunks.columns if chunks else context).to(hidden_states.device)
    if columns.dim() != 2 or columns.shape[0] != batch:
        raise ValueError(f"output columns must be [B={batch}, K], got {tuple(columns.shape)}")

    def project(part: Tensor) -> Tensor:
        selected = hidden_states.gather(0, part.t()[..., None].expand(-1, -1, hidden))  # [k, B, H]
        with _outside_sequence_parallel(output_layer if sequence_parallel else None):
            logits, _ = output_layer(selected, weight=output_weight, runtime_gather_output=runtime_gather_output)
        return scale_logits(logits).transpose(0, 1).contiguous()

    if chunks is None:
        return project(columns)
    for start in range(0, columns.shape[1], max(1, chunks.chunk)):
        chunks.consume(start, project(columns[:, start:start + chunks.chunk]))
    return hidden_states.new_zeros(())


def logits_at_columns(model, input_ids: Tensor, position_ids: Tensor, mask, columns: Tensor) -> Tensor:
    """``model(...)`` with the output layer on ``columns`` ``[B, K]`` only: ``[B, K, V/TP]`` on the
    last pipeline stage, the hidden states on other stages (see ``select_output_columns``)."""
    return model(input_ids, position_ids, mask, output_processor=select_output_columns,
                 output_processor_context=columns)


def forward_answer_columns(model, config: ModelConfig, input_ids: Tensor, layout: AttentionLayout,
                           prediction_columns: Tensor, needed: Tensor, micro_batch_size: int, consume,
                           chunk_tokens: int = 1024) -> None:
    """A forward-only pass through megatron's pipeline schedule that projects only the columns
    predicting the ``needed`` ``[B, A]`` answer positions (``prediction_columns`` ``[B, A]``), about
    ``chunk_tokens`` tokens at a time (``ColumnChunks``). On the last stage, ``consume(rows,
    answer_index, slot_valid, logits)`` gets a micro-batch's real rows ``[m]``, the answer positions
    of a chunk's slots ``[m, k]``, which slots are real ``[m, k]`` and their logits ``[m, k, V/TP]``.
    Used by the teacher (causal ``[prompt; answer]``) and the likelihood of students (OPD layout)."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func


    device = next(model.parameters()).device
    causal_kernel = uses_causal_kernel(model)
    if causal_kernel and not right_padded(layout.valid):
        raise ValueError("a model built with the causal attention kernel needs right-padded rows")
    input_ids, layout = pad_batch(input_ids, layout, sequence_multiple(model), config.pad_token_id)
    microbatches = []
    for rows, real in microbatch_rows(input_ids.shape[0], micro_batch_size):
        want = needed[rows] & real[:, None]
        width = max(1, int(want.sum(-1).max()))
        order = torch.sort((~want).to(torch.int8), dim=-1, stable=True).indices[:, :width]
        microbatches.append(dict(ids=input_ids[rows], layout=layout.rows(rows), rows=rows, real=real,
                                 answer_index=order, slot_valid=want.gather(1, order),
                                 columns=prediction_columns[rows].gather(1, order)))
    # expert parallelism: every rank of the EP group runs as many forwards (MoE layers exchange tokens)
    for _ in range(expert_parallel_max(len(microbatches)) - len(microbatches)):
        microbatches.append(idle_microbatch(micro_batch_size, input_ids.shape[1], config.pad_token_id or 0))

    def collect(mb, start: int, logits: Tensor):
        real, width = mb["real"], logits.shape[1]
        consume(mb["rows"][real], mb["answer_index"][real, start:start + width],
                mb["slot_valid"][real, start:start + width], logits[real.to(logits.device)])

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        lay = mb["layout"].to(device)
        consumer = (lambda start, logits: None) if mb.get("idle") else partial(collect, mb)
        chunks = ColumnChunks(mb["columns"], consumer, max(1, chunk_tokens // micro_batch_size))
        mask = None if causal_kernel else attention_mask(config, lay)
        output = logits_at_columns(model, mb["ids"].to(device), lay.position_ids, mask, chunks)
        return output, lambda out: (out.new_zeros(()), {})

    # whole rows on every context-parallel rank; the schedule sizes its pipeline buffers for a CP share
    # of seq_length, so it is told CP x the row
    cp = parallel_state.get_context_parallel_world_size()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=input_ids.shape[1] * cp,
        micro_batch_size=micro_batch_size, forward_only=True,
    )
