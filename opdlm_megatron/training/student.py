"""One student forward/backward on a ``SupervisedBatch``, through megatron-core's pipeline schedule.

Layouts (``SupervisedBatch.layout``):

* ``"opd"`` - ``[prompt | x0 | xt]`` (``masks.opd_training_batch``): the student sees the prompt and
  the clean answer x0 block-causally and, per block, the partially masked copy xt of that block; the
  prediction of answer token i is read at its ``prediction_columns`` column (its own xt column, or
  with the Dream-style logit shift the column before it).
* ``"causal"`` - ``[prompt; x0]`` with the causal mask; answer token i is predicted at the column
  before it (the ``ar`` objective).

The output layer runs only on the columns the loss reads (``model.select_output_columns``).

Packed states (``loss.pack_states``, with several states per answer: ``all_rounds``): the ``R`` states of
an answer share one row ``[prompt | x0 | xt_1 | .. | xt_R]`` whose attention gives every copy exactly what
a row of its own gives it (``masks.opd_packed_training_batch``), so the loss and gradients are the same
and the prompt and x0 are forwarded once per answer instead of once per state.

Targets: the teacher's distributions (``TeacherTargets``: packed logits or top-k of the supervised
positions; the per-token loss is the configured divergence, paper: forward KL), or the answer tokens
themselves (cross entropy, times ``weights`` when given: 1/t for the masked-diffusion losses).

Normalisation (``normalization``):

* ``"token"`` (default; paper Algorithm 1 sums over masked positions with w(t) = 1): the sum of the
  weighted per-token losses over the *global* batch (all micro-batches and data-parallel ranks)
  divided by the global number of ``normalizer`` tokens (all-reduced before the forward). Each rank
  back-propagates its share times the data-parallel size, which megatron DDP's gradient average
  undoes, so the gradient is that of the global per-token mean.
* ``"row"`` (the first layout): per row, the weighted sum over its supervised tokens divided by its
  ``normalizer`` count; then the mean over the rows of this rank with a supervised token (DDP then
  averages the ranks).

Context parallelism: each CP rank forwards its share of every row's columns and supervises the
answer positions predicted there; its loss is its part of the sum above, megatron's schedule scales
it by the CP size and DDP averages over data x context parallel ranks, so the gradient is the same.
Megatron-LM's ``[sum, count]`` pairs are summed over those ranks, hence the CP size in ``share``.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import torch
from megatron.core import parallel_state
from torch import Tensor

from ..config.choices import LOSS_NORMALIZATIONS
from ..config.model import ModelConfig
from ..config.precision import pad_batch
from ..distill.teacher import TeacherTargets
from ..model.build import attention_mask, logits_at_columns, sequence_multiple
from ..model.context_parallel import ColumnSplit, keys_gathered_over_context_parallel
from ..model.expert_parallel import expert_parallel_max, idle_microbatch
from ..model.losses import (
    DivergenceConfig,
    TeacherTopK,
    divergence,
    masked_diffusion_nll,
    unused_vocab_columns,
)
from ..model.masks import causal_layout, opd_packed_training_batch, opd_training_batch
from ..model.microbatches import microbatch_groups, microbatch_rows
from ..objectives.base import SupervisedBatch
from ..runtime.distributed import broadcast_from_last_stage, data_parallel_sum



def packs_states(batch: SupervisedBatch, pack_states: bool) -> bool:
    """Whether the student step packs ``batch``'s states of one answer into one row: asked for, and the
    batch holds several OPD states per answer (``loss.state_selection="all_rounds"``)."""
    return pack_states and batch.layout == "opd" and batch.groups is not None


def packed_model_input(config: ModelConfig, batch: SupervisedBatch):
    """``(input_ids [U, S], layout, prediction_columns [B, A], input_row [B])``: one row
    ``[prompt | x0 | xt_1 | .. | xt_R]`` per answer for the ``B`` state rows of its ``U`` answers
    (``masks.opd_packed_training_batch``); state row ``b``'s answer token i is predicted at column
    ``prediction_columns[b, i]`` of row ``input_row[b]``. The same attention as one row per state, so the
    same loss and gradients, with the prompt and x0 forwarded once per answer instead of once per state
    (at block 4 and one token per round, ``P + A + 4a`` columns for an answer of ``a`` tokens padded to
    ``A``, instead of ``4 (P + 2A)``). Callers choose it with ``pack_states`` (the trainer and the
    Megatron-LM plugin pass ``loss.pack_states``, default on); off by default here, for direct callers."""
    r = batch.answers
    first, inverse = batch.answer_rows()
    rank = torch.arange(batch.batch_size) - first[inverse]  # the rows of one answer are adjacent
    copies = int(rank.max()) + 1
    x0 = r.answer_ids[first]
    xt = x0[:, None].repeat(1, copies, 1)
    xt[inverse, rank] = batch.xt
    copy_valid = torch.zeros((first.numel(), copies), dtype=torch.bool)
    copy_valid[inverse, rank] = True
    opd = opd_packed_training_batch(r.prompt_ids[first], r.prompt_valid[first], x0, xt, copy_valid,
                                    r.answer_valid[first], config.block_size, config.logit_shift)
    return opd.input_ids, opd.layout, opd.prediction_columns[inverse, rank], inverse


def model_input(config: ModelConfig, batch: SupervisedBatch):
    """``(input_ids [B, S], layout, prediction_columns [B, A])`` of the student for ``batch``."""
    r = batch.answers
    if batch.layout == "opd":
        opd = opd_training_batch(r.prompt_ids, r.prompt_valid, r.answer_ids, batch.xt, r.answer_valid,
                                 config.block_size, config.logit_shift)
        return opd.input_ids, opd.layout, opd.prediction_columns
    # causal: the last answer token predicts nothing inside the answer, so it is not an input
    ids = torch.cat([r.prompt_ids, r.answer_ids[:, :-1]], 1)
    layout = causal_layout(torch.cat([r.prompt_valid, r.answer_valid[:, :-1]], 1))
    plen = r.prompt_ids.shape[1]
    columns = plen - 1 + torch.arange(r.answer_ids.shape[1])[None].expand(r.batch_size, -1)
    return ids, layout, columns


def _check_targets(config: ModelConfig, batch: SupervisedBatch, targets, last_stage: bool) -> None:
    if not batch.distill or not last_stage:
        return
    if not isinstance(targets, TeacherTargets):
        raise ValueError(f"a distillation batch needs TeacherTargets, got {type(targets).__name__}")
    shape = tuple(batch.answers.answer_ids.shape)
    if tuple(targets.index.shape) != shape:
        raise ValueError(f"teacher targets index {tuple(targets.index.shape)} must be [B, A] = {shape}")
    missing = batch.supervised & (targets.index < 0)
    if bool(missing.any()):
        raise ValueError(f"teacher targets lack {int(missing.sum())} supervised positions")
    if not isinstance(targets.logits, TeacherTopK):
        excluded = unused_vocab_columns(config)
        if targets.logits.shape[-1] != excluded.shape[0]:
            raise ValueError(f"teacher logits have {targets.logits.shape[-1]} vocabulary columns per rank, the "
                             f"student {excluded.shape[0]}: the vocabularies differ")


def _output_slots(rows: Tensor, real: Tensor, input_row: Tensor, supervised: Tensor, columns: Tensor) -> Dict:
    """The output slots of a micro-batch of input rows ``rows`` (``real``: not a filler): for each input row,
    the supervised ``(state row, answer position)`` pairs it predicts (state rows in order, positions
    ascending), padded to the widest row. ``input_row [B]`` is each state row's input row, ``columns
    [B, A]`` the column predicting each of its answer tokens. Returns ``state_rows``, ``answer_index``,
    ``columns`` (all ``[n, width]`` long) and ``slot_valid`` (bool)."""
    owner = (input_row[:, None] == rows[None, :]) & real[None, :]  # [B, n]: real rows are distinct
    position = torch.where(owner.any(1), owner.long().argmax(1), -1)
    state, answer = (supervised & (position >= 0)[:, None]).nonzero(as_tuple=True)
    slot_of = position[state]
    order = torch.sort(slot_of, stable=True).indices
    state, answer, slot_of = state[order], answer[order], slot_of[order]
    counts = torch.bincount(slot_of, minlength=len(rows))
    width = max(1, int(counts.max()) if counts.numel() else 1)
    offset = torch.arange(slot_of.numel()) - (torch.cumsum(counts, 0) - counts)[slot_of]
    out = {name: torch.zeros((len(rows), width), dtype=torch.long) for name in ("state_rows", "answer_index", "columns")}
    out["state_rows"][slot_of, offset] = state
    out["answer_index"][slot_of, offset] = answer
    out["columns"][slot_of, offset] = columns[state, answer]
    out["slot_valid"] = torch.zeros((len(rows), width), dtype=torch.bool)
    out["slot_valid"][slot_of, offset] = True
    return out


def _without_padding_columns(ids: Tensor, layout, multiple: int, pad_token_id: Optional[int]):
    """``(ids, layout, start)``: the columns ``[start, end)`` that hold a valid token in some row (the rest
    are attended by nothing and read by no loss), padded again to ``multiple``."""
    used = layout.valid.any(0).nonzero().flatten()
    if used.numel() == 0:
        return ids, layout, 0
    start, end = int(used[0]), int(used[-1]) + 1
    ids, layout = pad_batch(ids[:, start:end], layout.columns(start, end), multiple, pad_token_id)
    return ids, layout, start


class StudentStepPlan:
    """One student step on ``batch`` cut into micro-batches, for any caller of megatron's pipeline
    schedules: ``student_step`` here, and Megatron-LM's ``train_step`` (``megatron_lm/``), whose
    ``forward_step_func`` pulls the same micro-batches. Each micro-batch dict carries its plan
    (``mb["plan"]``), so one static forward-step function serves every step."""

    def __init__(self, model, config: ModelConfig, batch: SupervisedBatch, targets: Optional[TeacherTargets],
                 divergence_cfg: Optional[DivergenceConfig], micro_batch_size: int, normalization: str = "token",
                 num_rows: Optional[float] = None, pad_multiple: Optional[int] = None,
                 pack_states: bool = False) -> None:
        if normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {LOSS_NORMALIZATIONS}")
        if batch.distill and divergence_cfg is None:
            raise ValueError("a distillation batch needs a DivergenceConfig")
        self.config, self.batch, self.targets = config, batch, targets
        self.divergence_cfg, self.normalization = divergence_cfg, normalization
        self.micro_batch_size = micro_batch_size
        # True: the statistics are only Megatron-LM's [sum, count] pairs (its train_step logs every key)
        self.megatron_lm_logging = False
        self.last_stage = parallel_state.is_pipeline_last_stage()
        _check_targets(config, batch, targets, self.last_stage)
        self.dp_size = parallel_state.get_data_parallel_world_size()

        supervised = batch.supervised
        self.counts = batch.normalizer.sum(-1)
        rows_with_tokens = supervised.any(-1)
        # global sizes first (known before any forward): the denominators of the normalisations
        sizes = data_parallel_sum(torch.tensor([float(self.counts.sum()), float(supervised.sum()),
                                      float(rows_with_tokens.sum())], dtype=torch.float64))
        self.global_normalizer, self.global_supervised, self.global_rows = (float(x) for x in sizes)
        self.local_rows = float(rows_with_tokens.sum()) if num_rows is None else float(num_rows)

        self.packed = packs_states(batch, pack_states)
        if self.packed:
            input_ids, layout, prediction_columns, input_row = packed_model_input(config, batch)
        else:
            input_ids, layout, prediction_columns = model_input(config, batch)
            input_row = torch.arange(batch.batch_size)
        multiple = pad_multiple if pad_multiple is not None else sequence_multiple(model)
        # context parallelism: each CP rank forwards a zigzag share of every row's columns (2 x CP chunks
        # of whole multiples) and projects the supervised columns it holds (context_parallel.py)
        self.cp_size = parallel_state.get_context_parallel_world_size()
        input_ids, layout = pad_batch(input_ids, layout, multiple * (2 * self.cp_size if self.cp_size > 1 else 1),
                                      config.pad_token_id)
        self.seq_length = input_ids.shape[1]
        self.split = (ColumnSplit.zigzag(self.seq_length, parallel_state.get_context_parallel_rank(), self.cp_size)
                      if self.cp_size > 1 else None)
        if self.split is not None:  # the supervised positions predicted in this rank's columns, local indices
            local_columns = self.split.position[prediction_columns]
            supervised = supervised & (local_columns >= 0)
            prediction_columns = local_columns.clamp_min(0)
        if self.packed:  # one input row per answer: micro_batch_size answers, as for the grouped rows below
            plan = microbatch_rows(input_ids.shape[0], micro_batch_size)
        elif batch.groups is None:
            plan = microbatch_rows(batch.batch_size, micro_batch_size)
        else:  # the rows of micro_batch_size answers per micro-batch, equal in number under PP (fixed p2p shapes)
            plan = microbatch_groups(batch.groups, micro_batch_size,
                                     equal_rows=parallel_state.get_pipeline_model_parallel_world_size() > 1)
        # expert parallelism: every rank of the EP group runs as many micro-batches (an MoE forward and
        # backward exchange tokens among them); the missing ones are idle (model/expert_parallel.py)
        self.num_microbatches = expert_parallel_max(len(plan))
        self.rows_per_microbatch = max(len(rows) for rows, _ in plan)
        self.device = next(model.parameters()).device
        self.excluded = unused_vocab_columns(config).to(self.device)
        self.chunk = divergence_cfg.chunk_tokens if divergence_cfg is not None else 1024

        # without pipeline or context parallelism each micro-batch may have its own width: cut the columns
        # that are padding in all of its rows (left prompt padding, the packed copies' tail)
        trim = parallel_state.get_pipeline_model_parallel_world_size() == 1 and self.split is None
        self.microbatches = []
        for rows, real in plan:
            slots = _output_slots(rows, real, input_row, supervised, prediction_columns)
            ids, lay = input_ids[rows], layout.rows(rows)
            if trim:
                ids, lay, start = _without_padding_columns(ids, lay, multiple, config.pad_token_id)
                slots["columns"] = (slots["columns"] - start).clamp_min(0)
            self.microbatches.append(dict(plan=self, ids=ids, layout=lay, rows=rows, **slots))
        for _ in range(self.num_microbatches - len(plan)):
            self.microbatches.append(dict(plan=self, **idle_microbatch(self.rows_per_microbatch, self.seq_length,
                                                                       config.pad_token_id or 0)))

    def loss_func(self, mb, output: Tensor):
        """(loss to back-propagate, statistics): ``loss`` (this micro-batch's share of the step's loss),
        ``token_sum`` (unweighted per-token losses), and Megatron-LM's ``[sum, count]`` logging pairs
        ``opd loss`` (sum over micro-batches and data-parallel ranks = the step's loss) and
        ``opd per-token loss`` (the unweighted mean over supervised tokens)."""
        if mb.get("idle"):
            return self._idle_loss(output)
        batch, targets = self.batch, self.targets
        slot_valid = mb["slot_valid"].to(output.device)
        which_row, which_slot = slot_valid.nonzero(as_tuple=True)
        student_logits = output[which_row, which_slot]
        global_rows = mb["state_rows"].to(output.device)[which_row, which_slot]
        answer_idx = mb["answer_index"].to(output.device)[which_row, which_slot]
        if batch.distill:
            teacher_logits = targets.lookup(global_rows, answer_idx, output.device)
            per_token = divergence(student_logits, teacher_logits, self.divergence_cfg, self.excluded)
            per_token = self._corrected(per_token, student_logits, global_rows, answer_idx, output.device)
        else:
            ids = batch.answers.answer_ids.to(output.device)[global_rows, answer_idx]
            per_token = masked_diffusion_nll(student_logits, ids, self.excluded, self.chunk)
        weighted = per_token
        if batch.weights is not None:
            weighted = per_token * batch.weights.to(output.device)[global_rows, answer_idx].to(per_token.dtype)
        if self.normalization == "token":
            total = weighted.sum() / max(self.global_normalizer, 1.0)
            contribution = total * self.dp_size
            share = 1.0 / (self.num_microbatches * self.dp_size * self.cp_size)
        else:
            denom = self.counts.to(output.device)[global_rows].clamp_min(1).to(weighted.dtype)
            total = (weighted / denom).sum() / max(self.local_rows, 1.0)
            contribution = total
            share = 1.0 / (self.num_microbatches * self.cp_size)
        detached = total.detach().float()
        token_sum = per_token.detach().sum().float()
        stats = {
            "opd loss": torch.stack([detached, detached.new_tensor(share)]),
            "opd per-token loss": torch.stack([token_sum, token_sum.new_tensor(float(per_token.numel()))]),
        }
        if not self.megatron_lm_logging:
            stats.update(loss=total.detach(), token_sum=per_token.detach().sum())
        # megatron divides each micro-batch's loss by num_microbatches; ours is already normalised
        return contribution * self.num_microbatches, stats

    def _idle_loss(self, output: Tensor):
        """An idle micro-batch's zero loss: its backward still runs through the MoE layers' exchanges."""
        zero = output.sum() * 0.0
        share = 1.0 / (self.num_microbatches * (self.dp_size if self.normalization == "token" else 1) * self.cp_size)
        stats = {"opd loss": torch.stack([zero.detach().float(), zero.new_tensor(share).float()]),
                 "opd per-token loss": torch.stack([zero.detach().float(), zero.new_tensor(0.0).float()])}
        if not self.megatron_lm_logging:
            stats.update(loss=zero.detach(), token_sum=zero.detach())
        return zero, stats

    def _corrected(self, per_token: Tensor, student_logits: Tensor, rows: Tensor, positions: Tensor, device) -> Tensor:
        """``D(q) + w (D(q_alt) - D(q))`` where the targets carry a second target (TCS's routed positions)."""
        found = self.targets.lookup_correction(rows, positions, device)
        if found is None:
            return per_token
        which, weights, alternative = found
        if not bool(which.any()):
            return per_token
        other = divergence(student_logits[which], alternative, self.divergence_cfg, self.excluded)
        delta = torch.zeros_like(per_token).index_put((which.nonzero().flatten(),),
                                                      weights.to(per_token.dtype) * (other - per_token[which]))
        return per_token + delta

    def forward_microbatch(self, mb, model):
        """megatron's ``forward_step_func`` body for one of this plan's micro-batches."""
        lay = mb["layout"].to(self.device)
        ids = mb["ids"].to(self.device)
        if self.split is None:
            output = logits_at_columns(model, ids, lay.position_ids, attention_mask(self.config, lay), mb["columns"])
        else:  # this rank's columns; attention gathers the keys of all of them
            queries, keys = self.split.layouts(lay)
            with keys_gathered_over_context_parallel(self.split):
                output = logits_at_columns(model, self.split.ids(ids), queries.position_ids,
                                           attention_mask(self.config, queries, keys), mb["columns"])
        return output, partial(self.loss_func, mb)

    def summarize(self, results) -> Dict[str, float]:
        """The step's numbers from the schedule's per-micro-batch statistics (identical on every rank)."""
        totals = torch.zeros(2, dtype=torch.float64)
        if self.last_stage:
            totals[0] = sum(float(r["loss"]) for r in results)
            totals[1] = sum(float(r["token_sum"]) for r in results)
        broadcast_from_last_stage(totals)
        data_parallel_sum(totals)
        if self.cp_size > 1:  # each CP rank holds the loss of its own columns
            torch.distributed.all_reduce(totals, group=parallel_state.get_context_parallel_group())
        loss = float(totals[0]) if self.normalization == "token" else float(totals[0]) / self.dp_size
        return {
            "loss": loss,
            "num_tokens": self.global_supervised,
            "num_rows": self.global_rows,
            "token_mean": float(totals[1]) / max(self.global_supervised, 1.0),
        }


def forward_step(data_iterator, model):
    """A megatron ``forward_step_func`` for ``StudentStepPlan`` micro-batches."""
    mb = next(data_iterator)
    return mb["plan"].forward_microbatch(mb, model)


def student_step(
    model,
    config: ModelConfig,
    batch: SupervisedBatch,
    targets: Optional[TeacherTargets],
    divergence_cfg: Optional[DivergenceConfig],
    micro_batch_size: int,
    normalization: str = "token",
    forward_only: bool = False,
    num_rows: Optional[float] = None,
    pack_states: bool = False,
) -> Dict[str, float]:
    """Runs the student on ``batch`` over micro-batches; gradients accumulate in ``model``.

    ``model``: this rank's part of the student (bare or megatron-DDP-wrapped); ``batch``: this data-
    parallel rank's rows; ``targets``: the teacher's targets for them (last pipeline stage; ignored
    for cross-entropy batches). ``num_rows`` overrides the row count of the ``"row"`` normalisation.
    ``pack_states`` (``loss.pack_states``): the states of one answer share one input row (``packed_model_input``).

    Returns floats identical on every rank: ``loss`` (the objective over the global batch),
    ``num_tokens`` (supervised tokens, global), ``num_rows`` (rows with a supervised token, global),
    ``token_mean`` (unweighted mean per-token loss over the supervised tokens, global).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    plan = StudentStepPlan(model, config, batch, targets, divergence_cfg, micro_batch_size, normalization, num_rows,
                           pack_states=pack_states)
    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(plan.microbatches), model=[model],
        num_microbatches=plan.num_microbatches, seq_length=plan.seq_length,
        micro_batch_size=plan.rows_per_microbatch, forward_only=forward_only,
    )
    return plan.summarize(results)
