"""The layer norms of megatron's local layer spec, usable with sequence parallelism.

Without apex, megatron-core's local spec normalises with ``WrappedTorchNorm`` (torch's LayerNorm /
RMSNorm), which refuses ``sequence_parallel``: with SP each tensor-parallel rank normalises its own
share of the sequence, so a norm weight's gradient is a partial sum that megatron's
``finalize_model_grads`` must all-reduce over the TP group, and it does so only for parameters
marked ``sequence_parallel`` (apex's ``FusedLayerNorm`` and Transformer Engine's norms mark theirs;
torch's modules do not). ``SequenceParallelTorchNorm`` is that norm with the mark; the forward is
torch's, unchanged.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm`` whose parameters carry ``sequence_parallel = config.sequence_parallel``
    (what megatron's fused norms set), so that under SP their gradients are reduced over TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        # WrappedTorchNorm asserts SP off only because torch's norm would not be marked; marked below
        config.sequence_parallel = False
        try:
            norm = WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for parameter in norm.parameters():
            parameter.sequence_parallel = sequence_parallel
        return norm


def with_sequence_parallel_norms(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` (a transformer layer spec) with every ``WrappedTorchNorm`` submodule replaced by
    ``SequenceParallelTorchNorm`` (the input, pre-MLP and query/key norms); other norms are kept."""

    def swap(node):
        if node is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if isinstance(node, ModuleSpec):
            if node.module is WrappedTorchNorm:
                node.module = SequenceParallelTorchNorm
            if node.submodules is not None:
                swap_fields(node.submodules)
        return node

    def swap_fields(submodules) -> None:
        for name, value in vars(submodules).items():
            replaced = swap(value)
            if replaced is not value:
                setattr(submodules, name, replaced)

    swap(spec)
    return spec
