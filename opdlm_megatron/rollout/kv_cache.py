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
state dict is unchanged, and the hooks exist only inside ``with cache:``. The fused decoding forward
(``fused_forward.py``) calls ``extend`` itself instead (``hooks=False``). Each TP rank caches its own
heads and each PP stage its own layers.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor


def _self_attentions(model) -> list:
    from megatron.core.transformer.attention import SelfAttention

    return [m for m in model.modules() if isinstance(m, SelfAttention)]


class BlockKVCache:
    """Rotated keys/values ``[num_columns, rows, groups, dim]`` per local layer.

    Column ``c`` of row ``r`` holds the key of that row's sequence column ``c`` (prompt columns,
    left-padded, then answer blocks); columns from ``used`` on are scratch where each forward's own
    keys are written. Usage per forward: set ``used`` (how many leading columns the attention reads
    before the current keys), run the model, then ``commit`` the query slots that became final.
    """

    def __init__(self, model, num_columns: int, hooks: bool = True) -> None:
        self.attentions = _self_attentions(model)
        self.hooks = hooks  # False: the caller's forward calls ``extend`` itself (``FusedDecodeForward``)
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
        for index, attention in enumerate(self.attentions if self.hooks else []):
            hook = self._make_hook(index)
            self._handles.append(attention.core_attention.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Removes the hooks and frees the buffers (also before the ``with`` block ends: a rank that
        has finished decoding but keeps forwarding idle rows for expert parallelism)."""
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
            keys, values = self.extend(index, args[1], args[2])
            return (args[0], keys, values, *args[3:]), kwargs

        return hook

    def extend(self, index: int, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        """Layer ``index``'s keys/values to attend to: its cached columns followed by this
        forward's ``key``/``value`` ``[W, R, groups, dim]`` (kept for ``commit``)."""
        # The current keys are written right after the cached columns of the same buffer, so the
        # attention reads one contiguous slice instead of a torch.cat that would copy every cached
        # column of every layer on every forward (for 32 rows of 300 columns: ~440 MB per forward
        # of SmolLM2). Columns >= ``used`` hold no committed key of any row, so they are scratch.
        used, width = self.used, key.shape[0]
        keys, values = self._reserve(index, key, value, used + width)
        keys[used:used + width] = key
        values[used:used + width] = value
        self._current[index] = (keys[used:used + width], values[used:used + width])
        return keys[:used + width], values[:used + width]

    def _reserve(self, index: int, key: Tensor, value: Tensor, needed: int) -> Tuple[Tensor, Tensor]:
        """The layer's buffers, allocated (or grown, keeping their contents) to >= ``needed`` columns."""
        keys, values = self._keys[index], self._values[index]
        if keys is not None and keys.shape[1] != key.shape[1]:
            raise RuntimeError(f"BlockKVCache holds {keys.shape[1]} rows but the forward has {key.shape[1]}; "
                               "drop finished rows with select_rows")
        if keys is None or keys.shape[0] < needed:
            capacity = max(needed, self.num_columns)
            new_keys = key.new_zeros((capacity, *key.shape[1:]))
            new_values = value.new_zeros((capacity, *value.shape[1:]))
            if keys is not None:
                new_keys[: keys.shape[0]] = keys
                new_values[: values.shape[0]] = values
            self._keys[index], self._values[index] = keys, values = new_keys, new_values
        return keys, values

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
            # the right-hand sides are gathered copies, so overwriting the scratch columns they came
            # from is safe
            self._keys[index][cols, rows] = key[src, rows]
            self._values[index][cols, rows] = value[src, rows]

    def select_rows(self, keep: Tensor) -> None:
        """Drops finished rows: keeps batch rows ``keep`` (index tensor) of every cache."""
        self._keys = [k if k is None else k[:, keep] for k in self._keys]
        self._values = [v if v is None else v[:, keep] for v in self._values]
        self._current = [None] * len(self.attentions)
