"""Reductions over vocab-parallel logits that never gather the full vocabulary.

Each tensor-parallel rank holds ``logits[..., start:end]`` of the padded vocabulary (megatron's
column-parallel output layer). These helpers all-reduce only per-token scalars (max, sum, index) or
k candidates per token over the tensor-parallel group, so the traffic is O(tokens x k), not
O(tokens x vocab). Rows that are not real tokens (padding, [MASK] when sampling) are excluded by
the caller with ``model.mask_unused_vocab`` (set to -inf) before calling these.

Forward only unless stated: the losses in ``losses.py`` build their own autograd functions on top.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    """Tensor-parallel world size (the number of vocabulary shards)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def tp_sum(x: Tensor) -> Tensor:
    """Sums ``x`` over the tensor-parallel group in place (no-op at TP=1); returns ``x``."""
    if tp_size() > 1:
        dist.all_reduce(x, group=_tp_group())
    return x


def vocab_start(shard_width: int) -> int:
    """Global vocabulary index of this rank's first logit column (megatron's ``VocabUtility``)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.utils import VocabUtility

    return VocabUtility.vocab_range_from_per_partition_vocab_size(
        shard_width, parallel_state.get_tensor_model_parallel_rank(), tp_size())[0]


def vocab_shard_range(padded_vocab_size: int) -> Tuple[int, int]:
    """``[start, end)`` of the padded vocabulary held by this tensor-parallel rank (megatron's ``VocabUtility``)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.utils import VocabUtility

    return tuple(VocabUtility.vocab_range_from_global_vocab_size(
        padded_vocab_size, parallel_state.get_tensor_model_parallel_rank(), tp_size()))


def global_max(logits: Tensor) -> Tensor:
    """Max over the full vocabulary, ``[...]``."""
    local = logits.max(dim=-1).values
    if tp_size() > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=_tp_group())
    return local


def global_logsumexp(logits: Tensor, max_: Optional[Tensor] = None) -> Tensor:
    """log sum exp over the full vocabulary, ``[...]`` (numerically stable, fp32 accumulation)."""
    logits = logits.float()
    max_ = global_max(logits) if max_ is None else max_
    safe_max = torch.where(torch.isfinite(max_), max_, torch.zeros_like(max_))
    sum_exp = tp_sum(torch.exp(logits - safe_max[..., None]).sum(-1))
    return safe_max + torch.log(sum_exp)


def log_softmax(logits: Tensor) -> Tensor:
    """This rank's shard of the full-vocabulary log-softmax."""
    return logits.float() - global_logsumexp(logits)[..., None]


def global_argmax(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """(max value, global index) over the full vocabulary; ties go to the lowest index, as torch.argmax."""
    local_val, local_idx = logits.max(dim=-1)
    if tp_size() == 1:
        return local_val, local_idx
    global_idx = local_idx + vocab_start(logits.shape[-1])
    best = global_max(logits)
    # ranks without the max propose +inf index; the min over ranks is the lowest tied index
    candidate = torch.where(local_val == best, global_idx, torch.full_like(global_idx, torch.iinfo(global_idx.dtype).max))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=_tp_group())
    return best, candidate


def global_topk(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k (values, global indices) over the full vocabulary, sorted descending; ``[..., k]``.

    Each rank contributes its local top-k; the k best of the TP x k candidates win (all-gather of
    k values and indices per token).
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    k_local = min(k, logits.shape[-1])
    values, idx = logits.topk(k_local, dim=-1)
    idx = idx + vocab_start(logits.shape[-1])
    tp = tp_size()
    if tp > 1:
        all_values = [torch.empty_like(values) for _ in range(tp)]
        all_idx = [torch.empty_like(idx) for _ in range(tp)]
        dist.all_gather(all_values, values.contiguous(), group=_tp_group())
        dist.all_gather(all_idx, idx.contiguous(), group=_tp_group())
        values, idx = torch.cat(all_values, -1), torch.cat(all_idx, -1)
        # stable order on ties: sort candidates by index first, then by value
        order = idx.argsort(dim=-1, stable=True)
        values, idx = values.gather(-1, order), idx.gather(-1, order)
    k = min(k, values.shape[-1])
    top_values, pos = values.topk(k, dim=-1)
    return top_values, idx.gather(-1, pos)


def gather_global_columns(logits: Tensor, index: Tensor) -> Tensor:
    """``logits[..., index]`` for global vocabulary indices ``index`` ``[..., n]`` (summed over ranks)."""
    width = logits.shape[-1]
    local = index - vocab_start(width)
    inside = (local >= 0) & (local < width)
    return tp_sum(torch.where(inside, logits.float().gather(-1, local.clamp(0, width - 1)), 0.0))
