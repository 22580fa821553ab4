"""Context parallelism for the training layouts: each rank of the CP group holds a share of a row's
columns, and attention gathers the keys and values of all of them.

megatron-core's own context parallelism is Transformer Engine's ring attention, which serves causal
and padding masks, not the block-diffusion ``[prompt | x0 | xt]`` masks (an x0 column is attended by
xt columns of later blocks, an xt column only inside its block). This module does what works with any
mask (the approach Llama 3 used for document masks): every rank computes the queries, keys and
values of its own columns, all-gathers keys and values over the CP group (the gradient flows back by
reduce-scatter: megatron's ``gather_from_sequence_parallel_region`` over the CP group), and attends
with the rows of the global mask that belong to its queries. The gathered K/V of one layer are the
extra memory (``2 x S x kv_width`` per rank, freed after the layer's backward).

Balancing: the row's columns are cut into ``2 x CP`` equal chunks and rank r holds chunks r and
``2 CP - 1 - r`` (the zigzag megatron uses for causal CP): a long ``[prompt | x0 | xt]`` row is
back-heavy (prompt and x0 columns attend causally, each xt column its whole prefix and its block), so
pairing an early chunk with a late one evens out the attention work: max/min attended pairs over the
ranks 1.39 against 2.67 for contiguous shares at CP 4 (256-token answers; tests/test_context_parallel.py).

What uses it: the student's training forward (``training/student.py``) enters
``keys_gathered_over_context_parallel`` and hands each rank its columns (``ColumnSplit``); megatron's
pipeline schedule scales the loss by the CP size and megatron DDP reduces gradients over data x
context parallel ranks, as for its own CP. Everything else (the teacher's scoring, rollouts,
evaluation) runs a model's forward on whole rows, replicated over the CP ranks, and the attention
then gathers nothing: the TransformerConfig says CP 1, so no megatron code splits anything itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import Tensor

from .masks import AttentionLayout

# the ColumnSplit of the forward running now (None: whole rows, nothing gathered)
_SPLIT = contextvars.ContextVar("opdlm_context_parallel_split", default=None)


@contextlib.contextmanager
def keys_gathered_over_context_parallel(split: "ColumnSplit"):
    """Inside: the forwards' inputs are this rank's share ``split`` of each row's columns, and attention
    gathers keys and values over the CP group (back into column order)."""
    token = _SPLIT.set(split)
    try:
        yield
    finally:
        _SPLIT.reset(token)


class _KeysGatheredOverContextParallel:
    """Mixed in front of a core attention class (megatron's ``DotProductAttention``, Transformer Engine's
    ``TEDotProductAttention``, ``FlexCoreAttention``): same constructor, forward and state; inside
    ``keys_gathered_over_context_parallel`` its keys and values are all-gathered over the
    context-parallel group first (``ColumnSplit.gather``), and the mask it gets has this rank's query
    rows and every key column (``ColumnSplit.layouts``)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        split = _SPLIT.get()
        if split is not None:
            key, value = split.gather(key), split.gather(value)
        return super().forward(query, key, value, *args, **kwargs)


@functools.cache
def keys_gathered(core_attention: type) -> type:
    """``core_attention`` with its keys and values gathered over CP in the training forward."""
    return type(f"ContextParallel{core_attention.__name__}", (_KeysGatheredOverContextParallel, core_attention),
                {"__doc__": f"{core_attention.__name__} with keys and values gathered over context parallelism "
                            f"(model/context_parallel.py)"})


@dataclass(frozen=True)
class ColumnSplit:
    """This rank's columns of rows of ``S`` columns (a multiple of ``2 x`` the CP size), zigzag.

    ``local``: the global column ids this rank holds, in order ``[S / size]``; ``unzigzag``: where each
    column sits in the all-gathered ranks' columns (rank 0's, then rank 1's, ...) ``[S]``; ``position``:
    the local index of each global column on this rank, -1 elsewhere ``[S]``."""

    local: Tensor
    unzigzag: Tensor
    position: Tensor

    @staticmethod
    def zigzag(seq_len: int, rank: int, size: int) -> "ColumnSplit":
        if seq_len % (2 * size):
            raise ValueError(f"{seq_len} columns do not split into 2 x {size} equal chunks")
        chunk = seq_len // (2 * size)

        def columns(r: int) -> Tensor:
            return torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                              torch.arange((2 * size - 1 - r) * chunk, (2 * size - r) * chunk)])

        local = columns(rank)
        position = torch.full((seq_len,), -1, dtype=torch.long)
        position[local] = torch.arange(local.numel())
        gathered = torch.cat([columns(r) for r in range(size)])
        return ColumnSplit(local, torch.argsort(gathered), position)

    def gather(self, tensor: Tensor) -> Tensor:
        """This rank's ``[S / size, ...]`` (keys or values) -> every rank's, in column order ``[S, ...]``
        (the order the keys have without CP, so attention sums in the same order). Backward: the
        gradient of each rank's columns, summed over the ranks' queries (reduce-scatter)."""
        group = parallel_state.get_context_parallel_group()
        gathered = gather_from_sequence_parallel_region(tensor.contiguous(), tensor_parallel_output_grad=True,
                                                        group=group)
        return gathered.index_select(0, self.unzigzag.to(gathered.device))

    def ids(self, ids: Tensor) -> Tensor:
        """``[B, S]`` -> this rank's ``[B, S / size]``."""
        return ids[:, self.local.to(ids.device)]

    def layouts(self, layout: AttentionLayout):
        """``(queries, keys)``: the layouts of this rank's columns and of the gathered keys (all columns,
        in order), from which the attention mask of this rank's queries is built
        (``model.build.attention_mask(config, queries, keys)``: the same rule, never the whole ``S x S``
        mask)."""
        return layout.select(self.local), layout
