"""Attention structure for every use in OPDLM, from one rule.

Each token carries three attributes (an ``AttentionLayout``):

* ``block_ids`` - the block it belongs to (causal: its position; bidirectional: 0),
* ``noisy`` - False for clean tokens (prompt, committed answer x0), True for the partially masked
  copy ``xt`` of the OPD training layout,
* ``valid`` - False for padding.

Query q may attend key k iff k is valid and

* q clean: k clean and ``block(k) <= block(q)`` (block-causal; b=1 is causal, one block is bidirectional),
* q noisy: (k clean and ``block(k) < block(q)``) or (k noisy and ``block(k) == block(q)``),

so an ``xt`` token of block j sees the prompt, x0 of blocks < j, and xt of block j. Padding queries
attend everywhere: their outputs are finite garbage that no loss reads, and no valid query reads them.

An optional attribute ``copy`` packs several partially masked copies ``xt_1 .. xt_R`` of one answer into one
row (``[prompt | x0 | xt_1 | .. | xt_R]``, ``opd_packed_training_batch``): a noisy query then sees noisy
keys of its own block *and its own copy* only, so every copy is attended exactly as it would be in a row
of its own, while the prompt and x0 are forwarded once for all of them.

An optional further attribute, ``branch`` (0 = the trunk), appends *branches* to a causal trunk: short
alternative continuations that fork off it, all scored in the trunk's forward, so the trunk's keys
and values are computed once for every branch (TCS's candidate branches, ``objectives/tcs.py``). A
branch token sees the clean trunk tokens with ``block(k) <= block(q)`` (its block id is the last
trunk position it may see) and the tokens of its own branch up to its position; trunk tokens never
see branch tokens.

Every mask is available dense (megatron-core convention: a bool tensor ``[B, 1, Sq, Sk]`` in which
**True means "masked out"**, consumed by ``AttnMaskType.arbitrary``) and, where torch provides it, as
a FlexAttention ``BlockMask`` built from the same rule (``flex_block_mask``), which skips fully masked
tiles. KV-cached decoding uses the same rule with the layout of the cached keys concatenated in front
of the layout of the current queries (``AttentionLayout.cat`` / ``columns``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class AttentionLayout:
    """Per-token attention attributes of a batch, all of shape ``[B, S]``."""

    block_ids: Tensor
    noisy: Tensor
    valid: Tensor
    position_ids: Tensor
    branch: Optional[Tensor] = None  # [B, S] long, 0 = trunk; None: no branches
    copy: Optional[Tensor] = None  # [B, S] long, the xt copy of a noisy token (packed states); None: one copy

    def __post_init__(self) -> None:
        parts = (self.block_ids, self.noisy, self.valid, self.position_ids) + tuple(
            t for t in (self.branch, self.copy) if t is not None)
        shapes = {t.shape for t in parts}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"layout tensors must share one [B, S] shape, got {sorted(map(tuple, shapes))}")

    def _parts(self):
        return (self.block_ids, self.noisy, self.valid, self.position_ids, self.branch, self.copy)

    def branch_ids(self) -> Tensor:
        """``branch``, or zeros (all trunk) when the layout has no branches."""
        return self.branch if self.branch is not None else torch.zeros_like(self.block_ids)

    def copy_ids(self) -> Tensor:
        """``copy``, or zeros (a single xt copy) when the layout packs none."""
        return self.copy if self.copy is not None else torch.zeros_like(self.block_ids)

    @property
    def batch_size(self) -> int:
        return self.block_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.block_ids.shape[1]

    def columns(self, start: int, end: Optional[int] = None) -> "AttentionLayout":
        """The layout of sequence columns ``[start, end)``."""
        sl = slice(start, end)
        return AttentionLayout(*(None if t is None else t[:, sl] for t in self._parts()))

    def select(self, columns: Tensor) -> "AttentionLayout":
        """The layout of the sequence columns ``columns`` (long ``[K]``), in that order."""
        return AttentionLayout(*(None if t is None else t[:, columns.to(t.device)] for t in self._parts()))

    def rows(self, index: Tensor) -> "AttentionLayout":
        """The layout of the batch rows selected by ``index``."""
        return AttentionLayout(*(None if t is None else t[index] for t in self._parts()))

    @staticmethod
    def cat(layouts: Sequence["AttentionLayout"]) -> "AttentionLayout":
        """Concatenates layouts along the sequence (e.g. cached keys followed by new queries)."""
        branched = any(x.branch is not None for x in layouts)
        packed = any(x.copy is not None for x in layouts)
        return AttentionLayout(
            torch.cat([x.block_ids for x in layouts], 1),
            torch.cat([x.noisy for x in layouts], 1),
            torch.cat([x.valid for x in layouts], 1),
            torch.cat([x.position_ids for x in layouts], 1),
            torch.cat([x.branch_ids() for x in layouts], 1) if branched else None,
            torch.cat([x.copy_ids() for x in layouts], 1) if packed else None,
        )

    def pad_columns(self, multiple: int) -> "AttentionLayout":
        """Appends invalid columns up to a multiple of ``multiple`` (FP8 GEMM shapes): nothing
        attends to them, and what they compute is never read."""
        extra = -self.seq_len % max(1, multiple)
        if not extra:
            return self
        pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], 1)  # noqa: E731
        last_block = int(self.block_ids.max()) + 1 if self.block_ids.numel() else 0
        return AttentionLayout(pad(self.block_ids, last_block), pad(self.noisy, False), pad(self.valid, False),
                               pad(self.position_ids, 0), None if self.branch is None else pad(self.branch, 0),
                               None if self.copy is None else pad(self.copy, 0))

    def to(self, device) -> "AttentionLayout":
        return AttentionLayout(*(None if t is None else t.to(device) for t in self._parts()))

    # ------------------------------------------------------------------------------------ masks
    def allowed(self, keys: Optional["AttentionLayout"] = None) -> Tensor:
        """``[B, Sq, Sk]`` bool, True where query (this layout) may attend key (``keys``, default self)."""
        keys = self if keys is None else keys
        if keys.batch_size != self.batch_size:
            raise ValueError(f"query batch {self.batch_size} != key batch {keys.batch_size}")
        same_copy = None
        if self.copy is not None or keys.copy is not None:
            same_copy = self.copy_ids()[:, :, None] == keys.copy_ids()[:, None, :]
        allow = _allowed(
            self.block_ids[:, :, None], self.noisy[:, :, None], self.valid[:, :, None],
            keys.block_ids[:, None, :], keys.noisy[:, None, :], keys.valid[:, None, :], same_copy,
        )
        if self.branch is None and keys.branch is None:
            return allow
        return _branched(allow, self.branch_ids()[:, :, None], self.position_ids[:, :, None], self.valid[:, :, None],
                         keys.branch_ids()[:, None, :], keys.position_ids[:, None, :], keys.valid[:, None, :])

    def dense_mask(self, keys: Optional["AttentionLayout"] = None) -> Tensor:
        """megatron-core attention mask ``[B, 1, Sq, Sk]``: True = masked out."""
        return ~self.allowed(keys)[:, None]

    def flex_block_mask(self, keys: Optional["AttentionLayout"] = None, block_size: int = 128, compile: bool = False):
        """FlexAttention ``BlockMask`` for the same rule as ``allowed`` (all heads share it)."""
        from torch.nn.attention.flex_attention import create_block_mask

        keys = self if keys is None else keys
        qb, qn, qv = self.block_ids, self.noisy, self.valid
        kb, kn, kv = keys.block_ids, keys.noisy, keys.valid
        branched = self.branch is not None or keys.branch is not None
        qbr, qp, kbr, kp = self.branch_ids(), self.position_ids, keys.branch_ids(), keys.position_ids
        packed = self.copy is not None or keys.copy is not None
        qc, kc = self.copy_ids(), keys.copy_ids()

        def mask_mod(b, h, q_idx, kv_idx):
            same_copy = qc[b, q_idx] == kc[b, kv_idx] if packed else None
            allow = _allowed(qb[b, q_idx], qn[b, q_idx], qv[b, q_idx], kb[b, kv_idx], kn[b, kv_idx], kv[b, kv_idx],
                             same_copy)
            if not branched:
                return allow
            return _branched(allow, qbr[b, q_idx], qp[b, q_idx], qv[b, q_idx], kbr[b, kv_idx], kp[b, kv_idx],
                             kv[b, kv_idx])

        return create_block_mask(
            mask_mod, B=self.batch_size, H=None, Q_LEN=self.seq_len, KV_LEN=keys.seq_len,
            device=self.block_ids.device, BLOCK_SIZE=block_size, _compile=compile,
        )


def _allowed(qb, qn, qv, kb, kn, kv, same_copy=None):
    clean_rule = ~kn & (kb <= qb)
    own_block = kb == qb if same_copy is None else (kb == qb) & same_copy
    noisy_rule = (~kn & (kb < qb)) | (kn & own_block)
    allow = torch.where(qn, noisy_rule, clean_rule) & kv
    return allow | ~qv


def _branched(allow, qbr, qp, qv, kbr, kp, kv):
    """``allow`` (the rule without branches) restricted by branch ids: trunk queries see trunk keys
    only; a branch query sees the trunk keys ``allow`` gives it and its own branch causally."""
    trunk_key = kbr == 0
    own_branch = (kbr == qbr) & (kp <= qp) & kv
    rule = torch.where(qbr == 0, allow & trunk_key, (allow & trunk_key) | own_branch)
    return rule | ~qv


def branch_layout(trunk: AttentionLayout, branch_ids: Tensor, fork_blocks: Tensor, position_ids: Tensor,
                  valid: Tensor) -> AttentionLayout:
    """``trunk`` (a causal layout) followed by branch tokens ``[B, L]``: ``branch_ids`` (>= 1 for real
    tokens), ``fork_blocks`` (the last trunk block each token sees), their ``position_ids`` and ``valid``."""
    if trunk.branch is not None or bool(trunk.noisy.any()):
        raise ValueError("branches fork off a clean trunk without branches")
    if bool((branch_ids[valid] < 1).any()):
        raise ValueError("real branch tokens need branch ids >= 1 (0 is the trunk)")
    tail = AttentionLayout(fork_blocks, torch.zeros_like(valid), valid, position_ids, branch_ids)
    return AttentionLayout.cat([trunk, tail])


# ------------------------------------------------------------------------------------ builders
def right_padded(valid: Tensor) -> bool:
    """Whether every row of ``valid`` ``[B, S]`` has its padding after its tokens (no valid after invalid)."""
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())


def positions_from_valid(valid: Tensor) -> Tensor:
    """Position ids counting valid tokens only (left padding gets position 0)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def _check_valid(valid: Tensor) -> Tensor:
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a [B, S] bool tensor, got shape {tuple(valid.shape)} dtype {valid.dtype}")
    return valid


def block_ids_for(positions: Tensor, block_size: int, prompt_lengths: Optional[Tensor] = None) -> Tensor:
    """Block id of each position.

    Without ``prompt_lengths`` blocks tile the sequence from position 0. With them, the prompt is
    tiled from its start (its last block may be short) and the answer starts a fresh block, so every
    answer block holds exactly ``block_size`` answer tokens.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if prompt_lengths is None:
        return positions // block_size
    plen = prompt_lengths.to(positions.device).long()[:, None]
    prompt_blocks = (plen + block_size - 1) // block_size
    in_prompt = positions < plen
    return torch.where(in_prompt, positions // block_size, prompt_blocks + (positions - plen) // block_size)


def causal_layout(valid: Tensor) -> AttentionLayout:
    """Teacher / AR layout: every token its own block."""
    valid = _check_valid(valid)
    pos = positions_from_valid(valid)
    return AttentionLayout(pos.clone(), torch.zeros_like(valid), valid, pos)


def bidirectional_layout(valid: Tensor) -> AttentionLayout:
    """Full bidirectional attention over the valid tokens (block size = sequence length)."""
    valid = _check_valid(valid)
    pos = positions_from_valid(valid)
    return AttentionLayout(torch.zeros_like(pos), torch.zeros_like(valid), valid, pos)


def block_causal_layout(valid: Tensor, block_size: int, prompt_lengths: Optional[Tensor] = None) -> AttentionLayout:
    """Student layout: bidirectional inside blocks of ``block_size``, causal across blocks."""
    valid = _check_valid(valid)
    pos = positions_from_valid(valid)
    return AttentionLayout(block_ids_for(pos, block_size, prompt_lengths), torch.zeros_like(valid), valid, pos)


@dataclass
class OPDBatch:
    """Student input of the OPD training layout ``[prompt | x0 | xt]`` (paper, Algorithm 1).

    ``input_ids``/``layout`` are ``[B, P + 2A]``: prompts left-padded to ``P``, answers right-padded
    to ``A``. ``xt_columns`` ``[B, A]`` index the xt copy of every answer token, ``prediction_columns``
    ``[B, A]`` the column whose output predicts that answer token (itself, or with a logit shift the
    previous token's column: inside the block its xt column, across a block boundary the clean x0 or
    prompt column), ``answer_valid`` ``[B, A]`` marks real answer tokens. The packed layout
    (``opd_packed_training_batch``) is ``[B, P + (1 + R) A]`` with ``R`` copies of xt, and its column
    tensors are ``[B, R, A]``.
    """

    input_ids: Tensor
    layout: AttentionLayout
    xt_columns: Tensor
    prediction_columns: Tensor
    answer_valid: Tensor

    @property
    def position_ids(self) -> Tensor:
        return self.layout.position_ids


def opd_training_batch(
    prompt_ids: Tensor,
    prompt_valid: Tensor,
    x0_ids: Tensor,
    xt_ids: Tensor,
    answer_valid: Tensor,
    block_size: int,
    logit_shift: bool = False,
) -> OPDBatch:
    """Builds the ``[prompt | x0 | xt]`` layout.

    ``prompt_ids``/``prompt_valid`` ``[B, P]`` are left-padded; ``x0_ids``/``xt_ids``/``answer_valid``
    ``[B, A]`` right-padded. xt shares position ids with x0. Prompt and x0 are block-causal (the
    answer starts a fresh block); xt of block j sees the prompt, x0 of earlier blocks and xt of block j.
    """
    _check_valid(prompt_valid)
    _check_valid(answer_valid)
    if x0_ids.shape != xt_ids.shape or x0_ids.shape != answer_valid.shape:
        raise ValueError(
            f"x0 {tuple(x0_ids.shape)}, xt {tuple(xt_ids.shape)} and answer_valid "
            f"{tuple(answer_valid.shape)} must have one shape"
        )
    batch = opd_packed_training_batch(prompt_ids, prompt_valid, x0_ids, xt_ids[:, None], None, answer_valid,
                                      block_size, logit_shift)
    return replace(batch, xt_columns=batch.xt_columns[:, 0], prediction_columns=batch.prediction_columns[:, 0])


def opd_packed_training_batch(
    prompt_ids: Tensor,
    prompt_valid: Tensor,
    x0_ids: Tensor,
    xt_ids: Tensor,
    copy_valid: Optional[Tensor],
    answer_valid: Tensor,
    block_size: int,
    logit_shift: bool = False,
) -> OPDBatch:
    """Builds the packed ``[prompt | x0 | xt_1 | .. | xt_R]`` layout: ``R`` partially masked copies of
    one answer in one row (every round of every block, ``loss.state_selection="all_rounds"``).

    ``xt_ids`` ``[B, R, A]``; ``copy_valid`` ``[B, R]`` bool (None: all) marks the copies a row really
    has. Copy ``r`` of block j sees the prompt, x0 of earlier blocks and copy ``r`` of block j - exactly
    what it sees as the xt of a row of its own - so the prompt and x0 are forwarded once for all ``R``
    states. With ``R > 1`` the copies are laid out back to back at the row's own answer length (copy
    ``r`` of a row with ``a`` answer tokens at columns ``P + A + r a ..``; a row's missing copies take no
    columns), so the columns after a row's last copy are padding that a caller may cut
    (``StudentStepPlan`` does, per micro-batch). ``xt_columns`` and ``prediction_columns`` are
    ``[B, R, A]`` (at padding positions: some column of the row, never read). With ``R = 1`` the layout
    is ``opd_training_batch``'s (no ``copy`` attribute).
    """
    _check_valid(prompt_valid)
    _check_valid(answer_valid)
    if xt_ids.dim() != 3 or x0_ids.shape != answer_valid.shape or xt_ids[:, 0].shape != x0_ids.shape:
        raise ValueError(
            f"x0 {tuple(x0_ids.shape)}, xt {tuple(xt_ids.shape)} and answer_valid "
            f"{tuple(answer_valid.shape)} must be [B, A], [B, R, A] and [B, A]"
        )
    bsz, copies, alen_max = xt_ids.shape
    if copy_valid is None:
        copy_valid = torch.ones((bsz, copies), dtype=torch.bool, device=xt_ids.device)
    if copy_valid.dtype != torch.bool or tuple(copy_valid.shape) != (bsz, copies):
        raise ValueError(f"copy_valid must be a [B, R] = [{bsz}, {copies}] bool tensor, got {tuple(copy_valid.shape)}")
    if prompt_ids.shape != prompt_valid.shape or prompt_ids.shape[0] != x0_ids.shape[0]:
        raise ValueError(f"prompt {tuple(prompt_ids.shape)} does not match answers {tuple(x0_ids.shape)}")
    if answer_valid.any():
        # right padding: once a row's answer stops, it stays stopped
        if not right_padded(answer_valid):
            raise ValueError("answer_valid must be right-padded (no valid token after a padding token)")
    if (prompt_valid[:, :-1] & ~prompt_valid[:, 1:]).any():
        raise ValueError("prompt_valid must be left-padded (no padding token after a valid token)")
    if not prompt_valid.any(-1).all():
        raise ValueError("every row needs at least one prompt token")

    plen_max = prompt_ids.shape[1]
    device = prompt_ids.device
    prompt_lengths = prompt_valid.sum(-1)

    prompt_pos = positions_from_valid(prompt_valid)
    answer_pos = prompt_lengths[:, None] + torch.arange(alen_max, device=device)[None]
    prompt_blocks = block_ids_for(prompt_pos, block_size)
    answer_blocks = block_ids_for(answer_pos, block_size, prompt_lengths)

    clean = torch.zeros_like(answer_valid)
    prefix = AttentionLayout(
        block_ids=torch.cat([prompt_blocks, answer_blocks], 1),
        noisy=torch.cat([torch.zeros_like(prompt_valid), clean], 1),
        valid=torch.cat([prompt_valid, answer_valid], 1),
        position_ids=torch.cat([prompt_pos, answer_pos], 1),
    )
    answer_index = torch.arange(alen_max, device=device)[None, None].expand(bsz, copies, -1)
    copy_index = torch.arange(copies, device=device)[None, :, None]
    if copies == 1:  # [prompt | x0 | xt], every row at the padded answer length
        stride = torch.full((bsz, 1, 1), alen_max, dtype=torch.long, device=device)
        width = alen_max
    else:  # copies back to back at each row's answer length; a row's missing copies take no columns
        lengths = answer_valid.sum(-1)
        if bool((copy_valid[:, 1:] & ~copy_valid[:, :-1]).any()):
            raise ValueError("copy_valid must mark each row's first copies (no real copy after a missing one)")
        stride = lengths[:, None, None]
        width = max(1, int((lengths * copy_valid.sum(-1)).max()))
    xt_offset = stride * copy_index + answer_index  # [B, R, A] within the copies' region
    real = answer_valid[:, None, :] & copy_valid[:, :, None]
    # R = 1 keeps every position (padding included) at its own column; packed copies place real tokens only
    placed = real if copies > 1 else torch.ones_like(real)
    row_index, copy_at, answer_at = placed.nonzero(as_tuple=True)
    placed_columns = xt_offset[row_index, copy_at, answer_at]
    target = torch.where(placed, xt_offset, torch.full_like(xt_offset, width - 1))  # padding: a column never read

    def region(values: Tensor, fill) -> Tensor:
        out = torch.full((bsz, width), fill, dtype=values.dtype, device=device)
        out[row_index, placed_columns] = values[row_index, copy_at, answer_at]
        return out

    per_copy = lambda t: t[:, None, :].expand(-1, copies, -1)  # noqa: E731
    layout = AttentionLayout.cat([prefix, AttentionLayout(
        block_ids=region(per_copy(answer_blocks), 0),
        noisy=torch.ones((bsz, width), dtype=torch.bool, device=device),
        valid=region(real, False),
        position_ids=region(per_copy(answer_pos), 0),
        copy=None if copies == 1 else region(copy_index.expand(bsz, -1, alen_max) + 1, 0),
    )])
    input_ids = torch.cat([prompt_ids, x0_ids, region(xt_ids, 0)], 1)

    xt_columns = plen_max + alen_max + target
    if not logit_shift:
        prediction_columns = xt_columns
    else:
        starts_block = (answer_index % block_size) == 0
        # previous token's clean column: the last prompt token for answer 0, else x0 of answer i-1
        prev_clean = torch.where(answer_index == 0, torch.full_like(answer_index, plen_max - 1),
                                 plen_max + answer_index - 1)
        prediction_columns = torch.where(starts_block, prev_clean, xt_columns - 1)
    return OPDBatch(input_ids, layout, xt_columns, prediction_columns, answer_valid)
