"""The model being trained as a scorer: ``log p(x0_i | state)`` and its argmax, without gradients.

LIFT picks which masked tokens to supervise by how learnable they are (the student's log-probability
of the true token under a superset-masked input), and TCS routes its extra teacher branches to the
positions where the student's and the teacher's argmax disagree. Both read the student on the
``[prompt | x0 | xt]`` layout of the training step (each xt block sees the clean earlier blocks), so
the scores are those of the state the loss will supervise.

The forward is megatron's forward-only pipeline schedule (``model.forward_answer_columns``): TP and
PP aware, the output layer projected only on the scored positions, results on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..config.model import ModelConfig
from ..model import vocab_parallel as vp
from ..model.build import forward_answer_columns
from ..model.losses import unused_vocab_columns
from ..model.masks import opd_training_batch
from ..rollout.types import RolloutResult
from ..runtime.distributed import broadcast_from_last_stage


@dataclass
class StudentScores:
    """``log_prob`` ``[B, A]`` fp32: ``log p(x0_i | prompt, x0 of earlier blocks, xt of i's block)`` at
    the scored positions (0 elsewhere); ``argmax`` ``[B, A]`` long: the student's most likely real
    token there (-1 elsewhere)."""

    log_prob: Tensor
    argmax: Tensor


class StudentScorer:
    """Scores answer positions with the student (this rank's part of it; bare or DDP-wrapped)."""

    def __init__(self, model, config: ModelConfig, micro_batch_size: int, chunk_tokens: int = 1024) -> None:
        self.model, self.config = model, config
        self.micro_batch_size, self.chunk_tokens = micro_batch_size, chunk_tokens

    @torch.no_grad()
    def __call__(self, answers: RolloutResult, xt: Tensor, positions: Tensor,
                 split_data_parallel: bool = False) -> StudentScores:
        """Scores ``positions`` ``[B, A]`` (bool) of ``answers`` in state ``xt``. A collective over the
        model-parallel groups; with ``split_data_parallel`` (a batch every data-parallel rank holds
        whole) each rank scores its share of the rows and the shares are summed over the group."""
        from megatron.core import parallel_state

        from ..runtime.distributed import data_parallel_share

        bsz, alen = answers.answer_ids.shape
        if xt.shape != (bsz, alen) or positions.shape != (bsz, alen) or positions.dtype != torch.bool:
            raise ValueError(f"xt {tuple(xt.shape)} and positions {tuple(positions.shape)} (bool) must be [B, A] = "
                             f"{(bsz, alen)}")
        log_prob = torch.zeros(bsz, alen, dtype=torch.float64)
        best = torch.zeros(bsz, alen, dtype=torch.float64)  # argmax + 1, so that a sum over ranks works
        rows = torch.arange(bsz)
        dp = parallel_state.get_data_parallel_world_size() if split_data_parallel else 1
        if dp > 1:
            start, end = data_parallel_share(bsz)
            rows = torch.arange(start, end)
        wanted = positions[rows] & answers.answer_valid[rows]
        if rows.numel() and bool(wanted.any()):
            part = answers.rows(rows)
            width = part.answer_ids.shape[1]
            self._score(part, xt[rows, :width], wanted[:, :width], rows, log_prob, best)
        broadcast_from_last_stage(log_prob)
        broadcast_from_last_stage(best)
        if dp > 1:
            group = parallel_state.get_data_parallel_group()
            dist.all_reduce(log_prob, group=group)
            dist.all_reduce(best, group=group)
        return StudentScores(log_prob.float(), best.long() - 1)

    def _score(self, part: RolloutResult, xt: Tensor, wanted: Tensor, rows: Tensor, log_prob: Tensor,
               best: Tensor) -> None:
        config = self.config
        opd = opd_training_batch(part.prompt_ids, part.prompt_valid, part.answer_ids, xt, part.answer_valid,
                                 config.block_size, config.logit_shift)
        device = next(self.model.parameters()).device
        excluded = unused_vocab_columns(config).to(device)

        def consume(local_rows, answer_index, slot_valid, logits):
            flat_rows = local_rows[:, None].expand_as(answer_index)[slot_valid]
            flat_pos = answer_index[slot_valid]
            chosen = logits[slot_valid.to(logits.device)].float().masked_fill(excluded, float("-inf"))
            target = part.answer_ids[flat_rows, flat_pos].to(logits.device)
            lse = vp.global_logsumexp(chosen)
            lp = vp.gather_global_columns(chosen, target[:, None])[:, 0] - lse
            top = vp.global_argmax(chosen)[1]
            log_prob[rows[flat_rows], flat_pos] = lp.double().cpu()
            best[rows[flat_rows], flat_pos] = top.double().cpu() + 1

        forward_answer_columns(self.model, config, opd.input_ids, opd.layout, opd.prediction_columns, wanted,
                               self.micro_batch_size, consume, self.chunk_tokens)
