"""Micro-batches of a batch's rows, for megatron's pipeline schedules (the student, the teacher and the
scorers all cut their rows this way)."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def microbatch_rows(batch_size: int, micro_batch_size: int) -> List[Tuple[Tensor, Tensor]]:
    """Row indices and a "real row" mask for each microbatch.

    Pipeline communication needs one tensor shape for all microbatches, so a short last
    microbatch is filled up by repeating its last row; the filler rows are marked False and their
    outputs are dropped (and get no loss).
    """
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    out = []
    for start in range(0, batch_size, micro_batch_size):
        rows = torch.arange(start, start + micro_batch_size)
        real = rows < batch_size
        out.append((rows.clamp_max(batch_size - 1), real))
    return out


def microbatch_groups(groups: Tensor, answers_per_microbatch: int, equal_rows: bool) -> List[Tuple[Tensor, Tensor]]:
    """Row indices and a "real row" mask for each micro-batch of rows grouped by answer (``groups``
    ``[B]``, non-decreasing): micro-batch k holds every row of answers ``k m .. (k + 1) m - 1``, so there
    are as many micro-batches as ``microbatch_rows`` makes for the answers alone (what Megatron-LM's
    micro-batch calculator expects). ``equal_rows``: shorter micro-batches are filled up to the
    longest by repeating their last row, marked False (pipeline communication needs one shape)."""
    if not isinstance(answers_per_microbatch, int) or answers_per_microbatch < 1:
        raise ValueError(f"micro_batch_size must be a positive integer, got {answers_per_microbatch!r}")
    if groups.numel() < 1:
        raise ValueError("a grouped batch needs at least one row")
    _, answer = torch.unique_consecutive(groups, return_inverse=True)
    step = answers_per_microbatch
    chunks = [((answer >= k) & (answer < k + step)).nonzero().flatten() for k in range(0, int(answer[-1]) + 1, step)]
    width = max(len(rows) for rows in chunks) if equal_rows else 0
    out = []
    for rows in chunks:
        real = torch.ones(max(width, len(rows)), dtype=torch.bool)
        real[len(rows):] = False
        out.append((torch.cat([rows, rows[-1:].expand(len(real) - len(rows))]), real))
    return out
