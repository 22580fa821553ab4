"""Expert parallelism: keeping the ranks of an expert-parallel group in step.

With ``expert_model_parallel_size`` > 1 every MoE layer exchanges tokens with the other ranks of the
expert-parallel (EP) group: megatron's all-to-all token dispatcher sends each token to the rank that
holds its expert and back (variable split sizes, so the ranks may forward different numbers of rows
and columns), in the forward and again in the backward. An MoE forward is therefore a collective
over the EP group: every rank must run the same number of them, in the same order.

The EP group is made of data-parallel ranks, which hold different rows. Where their work naturally
differs in length, the shorter ones run *idle forwards*, which take part in the exchanges and
contribute nothing:

* rollouts: each rank decodes its own prompts, and decoding ends when a rank's last row has ended
  (EOS, confidence, length). ``ExpertParallelLockstep.still_decoding`` asks the group once per
  decoding step whether any rank still has rows; a rank without rows then forwards one pad token
  (``idle_row``) while the others decode (``rollout/engine.py``);
* forward passes over micro-batches (the student's training step, the teacher's scoring, the
  student's scoring): states of one answer are dropped when nothing of it is masked, so two ranks
  may end up with different numbers of micro-batches; ``expert_parallel_max`` gives each the
  group's largest count, and the missing ones run as idle micro-batches (a zero loss, whose backward
  still passes through the experts' exchanges).

Dense models, and MoE models at EP 1, never synchronise: every function here returns at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from .masks import AttentionLayout, causal_layout


def expert_parallel_size() -> int:
    """The size of this rank's expert-parallel group (1 without MoE layers or without EP)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_expert_model_parallel_world_size()


def expert_parallel_max(count: int) -> int:
    """The largest ``count`` over this rank's expert-parallel group (``count`` itself at EP 1)."""
    if expert_parallel_size() == 1:
        return count
    value = torch.tensor([int(count)], dtype=torch.long)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=parallel_state.get_expert_model_parallel_group())
    return int(value.item())


class ExpertParallelLockstep:
    """Per decoding step: does any rank of the EP group still decode? (Always "this rank's own
    answer" at EP 1, without communication.)"""

    def __init__(self) -> None:
        self.active = expert_parallel_size() > 1

    def still_decoding(self, mine: bool) -> bool:
        """Whether this rank or any other rank of its EP group still has rows to decode."""
        if not self.active:
            return mine
        return expert_parallel_max(1 if mine else 0) == 1


def idle_row(rows: int, columns: int, pad_token_id: int) -> "tuple[Tensor, AttentionLayout]":
    """``(input_ids, layout)`` of an idle forward: ``rows`` x ``columns`` pad tokens, causally masked
    (every query sees at least itself, so no softmax row is empty)."""
    ids = torch.full((rows, columns), int(pad_token_id), dtype=torch.long)
    return ids, causal_layout(torch.ones(rows, columns, dtype=torch.bool))


def idle_microbatch(rows: int, columns: int, pad_token_id: int) -> dict:
    """An idle micro-batch for the forward-step functions over micro-batch dicts (``ids``, ``layout``,
    the output ``columns`` to project: one per row), marked ``idle`` so that nothing reads its output."""
    ids, layout = idle_row(rows, columns, pad_token_id)
    return dict(ids=ids, layout=layout, idle=True, columns=torch.zeros(rows, 1, dtype=torch.long))
