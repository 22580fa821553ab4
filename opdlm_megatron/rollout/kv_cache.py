"""KV cache of committed columns for block-diffusion decoding.

Why not megatron-core's inference contexts: ``StaticInferenceContext`` / ``DynamicInferenceContext``
are built for causal AR decoding: every key written at ``sequence_len_offset`` stays, all rows of a
batch share one offset (static) or are paged for flash-decode kernels (dynamic), and the mask is
implicitly causal. Block diffusion instead re-denoises the *same* block several times (its keys are
transient until the block is final), rows advance through blocks at their own pace, and the mask is
block-causal. So this cache keeps only *committed* columns (the prompt and finished blocks) and lets
the current forward's keys pass through uncached.

How: a forward pre-hook on every local self-attention's ``core_attention`` (DotProductAttention,
FlexCoreAttention or TEDotProductAttention: all take ``query, key, value, attention_mask`` as
``[s, b, heads, dim]``). RoPE has already been applied to q/k there (``OPDGPTModel`` rotates by
``position_ids``), so cached keys are stored rotated. The hook puts the cached keys/values in front
of the current ones; the caller passes the matching mask, built from
``AttentionLayout.cat([cached_layout, query_layout])``. Nothing is added to the module tree, so the
state dict is unchanged, and the hooks exist only inside ``with cache:``. Each TP rank caches its own
heads and each PP stage its own layers.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def _self_attentions(model) -> list:
    from megatron.core.transformer.attention import SelfAttention

    return [m for m in model.modules() if isinstance(m, SelfAttention)]


class BlockKVCache:
    """Rotated keys/values ``[num_columns, rows, groups, dim]`` per local layer.

    Column ``c`` of row ``r`` holds the key of that row's sequence column ``c`` (prompt columns,
    left-padded, then answer blocks). Usage per forward: set ``used`` (how many leading columns the
    hooks prepend), run the model, then ``commit`` the query slots that became final.
    """

    def __init__(self, model, num_columns: int) -> None:
        self.attentions = _self_attentions(model)
        if not self.attentions:
            raise ValueError("model has no megatron SelfAttention layers to cache")
        self.num_columns = num_columns
        self.used = 0
        self._keys: List[Optional[Tensor]] = [None] * len(self.attentions)
        self._values: List[Optional[Tensor]] = [None] * len(self.attentions)
        self._current: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(self.attentions)
        self._handles: list = []

    # ------------------------------------------------------------------------------ hooks
    def __enter__(self) -> "BlockKVCache":
        for index, attention in enumerate(self.attentions):
            hook = self._make_hook(index)
            self._handles.append(attention.core_attention.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keys = [None] * len(self.attentions)
        self._values = [None] * len(self.attentions)
        self._current = [None] * len(self.attentions)

    def _make_hook(self, index: int):
        def hook(module, args, kwargs):
            if len(args) < 3:
                raise RuntimeError("BlockKVCache expects core_attention(query, key, value, mask, ...) positionally")
            query, key, value = args[:3]
            self._current[index] = (key, value)
            if self.used and self._keys[index] is not None:
                key = torch.cat([self._keys[index][: self.used], key], 0)
                value = torch.cat([self._values[index][: self.used], value], 0)
            return (query, key, value, *args[3:]), kwargs

        return hook

    # ----------------------------------------------------------------------------- updates
    def commit(self, slots: Tensor, columns: Tensor, valid: Tensor) -> None:
        """Stores the last forward's keys/values of query slots ``slots`` ``[W]`` at sequence
        columns ``columns`` ``[R, W]`` for the rows/slots where ``valid`` ``[R, W]``."""
        if slots.numel() == 0 or not bool(valid.any()):
            return
        rows, which = valid.nonzero(as_tuple=True)
        cols = columns[rows, which]
        src = slots[which]
        for index, current in enumerate(self._current):
            if current is None:
                raise RuntimeError("BlockKVCache.commit called before a forward")
            key, value = current
            if self._keys[index] is None:
                shape = (self.num_columns, key.shape[1], *key.shape[2:])
                self._keys[index] = key.new_zeros(shape)
                self._values[index] = value.new_zeros(shape)
            self._keys[index][cols, rows] = key[src, rows]
            self._values[index][cols, rows] = value[src, rows]

    def select_rows(self, keep: Tensor) -> None:
        """Drops finished rows: keeps batch rows ``keep`` (index tensor) of every cache."""
        self._keys = [k if k is None else k[:, keep] for k in self._keys]
        self._values = [v if v is None else v[:, keep] for v in self._values]
        self._current = [None] * len(self.attentions)
