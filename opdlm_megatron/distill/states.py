"""Which partially masked answer ``xt`` the student is trained on.

* ``select_states``: states from the student's own reverse trajectory (OPDLM). ``commit_step``
  of a ``RolloutResult`` records the round at which every answer token was committed, so the state
  before round ``k`` is ``where(commit_step < k, x0, [MASK])``.

  - ``mode="trajectory"`` (paper, Algorithm 1): one round ``k ~ U{0, ..., R-1}`` per trajectory
    (``R`` = its number of rounds); the states before rounds ``0..R-1`` are exactly its non-terminal
    states. Blocks finished before round ``k`` are fully revealed (no loss), later blocks fully masked.
  - ``mode="block"`` (``training.one_state_per_block: True`` in the authors' code, which every
    published run script of divelab/OPDLM sets): every block independently gets one of its own
    rounds, uniformly, so every block is supervised at one of its intermediate states. The OPD layout
    conditions block ``b``'s xt on the clean x0 of earlier blocks, so blocks are independent.

* ``all_round_states`` (``loss.state_selection="all_rounds"``; ``one_state_per_block: False``, the
  default of the authors' ``configs/rl_bd3lm.yaml``, their ``one_round_vectorized``): every round of
  every block. Row ``r`` of an answer stands every block at its own ``r``-th state: the tokens
  committed before the block's ``r``-th distinct commit round are revealed, the rest masked (a block
  with ``r`` or fewer distinct rounds is fully revealed). An answer gives as many rows as its block
  with the most distinct rounds (at most ``block_size``); rows without a masked answer token are
  dropped. The authors' loss then takes the KL over every masked answer token of the row.

* ``random_mask_states``: OPDLM_off / off-policy KD (paper eq. 6): forward random masking of a
  final answer instead of a trajectory state.
* ``forward_mask``: the MDLM / BD3LM corruption (paper eq. 2): ``t ~ U(0, 1)`` per sequence (the
  paper) or per block, and each answer token masked with probability ``t``; ``t`` is returned for
  the 1/t weights of the masked-diffusion and SFT baselines.

All functions are pure and draw randomness only from the given ``torch.Generator`` (CPU), so a run
that restores the generator state reproduces its states exactly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..config.choices import NOISE_LEVELS, STATE_SELECTIONS
from ..rollout.types import RolloutResult

STATE_MODES = STATE_SELECTIONS[:2]  # one row per answer (select_states); "all_rounds": all_round_states


def _uniform_index(counts: Tensor, generator: torch.Generator) -> Tensor:
    """For every entry an integer uniform in ``[0, counts)`` (0 where ``counts == 0``)."""
    u = torch.rand(counts.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((u * counts).floor().long(), (counts - 1).clamp_min(0))


def _check_result(result: RolloutResult) -> None:
    shape = result.answer_ids.shape
    if result.commit_step.shape != shape or result.answer_valid.shape != shape:
        raise ValueError(
            f"commit_step {tuple(result.commit_step.shape)} and answer_valid {tuple(result.answer_valid.shape)} "
            f"must match answer_ids {tuple(shape)}"
        )
    if (result.answer_valid & (result.commit_step < 0)).any():
        raise ValueError("every valid answer token needs a commit_step >= 0")


def select_states(result: RolloutResult, mode: str, generator: torch.Generator, mask_token_id: int,
                  block_size: Optional[int] = None) -> Tensor:
    """xt ``[B, A]``: one non-terminal state of each trajectory (``"trajectory"``) or of each block (``"block"``).

    ``block_size``: the rollout's block size (blocks are counted from the first answer token, as in
    the OPD layout); required by ``mode="block"``, unused by ``"trajectory"``. Padding positions hold ``mask_token_id``; rows without an answer are
    all ``mask_token_id`` (and contribute no loss).
    """
    if mode not in STATE_MODES:
        raise ValueError(f"unknown state selection mode {mode!r}; expected one of {STATE_MODES}")
    _check_result(result)
    if mode == "trajectory":
        steps = result.commit_step.long().masked_fill(~result.answer_valid, -1)
        rounds = steps.amax(-1) + 1 if steps.shape[1] else torch.zeros(steps.shape[0], dtype=torch.long)
        chosen = _uniform_index(rounds, generator)
        return result.state_before_round(chosen, mask_token_id)
    if block_size is None:
        raise ValueError("mode='block' needs block_size= (the block size the rollout decoded with)")
    return result.state_before_round(_block_rounds(result, generator, block_size), mask_token_id)


def _block_rounds(result: RolloutResult, generator: torch.Generator, block_size: int) -> Tensor:
    """``[B, A]``: for every token, a round drawn uniformly from the distinct commit rounds of its block."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    bsz, alen = result.answer_ids.shape
    num_blocks = -(-alen // block_size)
    pad = num_blocks * block_size - alen
    # sentinel larger than any round for padding, so it sorts last and is never chosen
    sentinel = torch.iinfo(torch.int32).max
    steps = result.commit_step.long().masked_fill(~result.answer_valid, sentinel)
    steps = torch.nn.functional.pad(steps, (0, pad), value=sentinel).view(bsz, num_blocks, block_size)
    ordered = steps.sort(-1).values
    first_of_value = torch.ones_like(ordered, dtype=torch.bool)
    first_of_value[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    first_of_value &= ordered != sentinel
    distinct = first_of_value.sum(-1)  # [B, blocks]
    pick = _uniform_index(distinct, generator)
    rank = first_of_value.long().cumsum(-1) - 1  # index of each distinct value
    hit = first_of_value & (rank == pick[..., None])
    chosen = torch.where(hit, ordered, torch.zeros_like(ordered)).sum(-1)  # 0 for empty blocks
    return chosen.repeat_interleave(block_size, dim=1)[:, :alen]


def commit_ranks(result: RolloutResult, block_size: int) -> Tensor:
    """``[B, A]``: for every valid answer token, the rank of its commit round among the distinct commit
    rounds of its block (0 for the block's first round); -1 on padding. Blocks are counted from the
    first answer token, as in the OPD layout."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    _check_result(result)
    bsz, alen = result.answer_ids.shape
    pad = (-alen) % block_size
    valid = torch.nn.functional.pad(result.answer_valid, (0, pad), value=False).view(bsz, -1, block_size)
    steps = torch.nn.functional.pad(result.commit_step.long(), (0, pad), value=-1).view(bsz, -1, block_size)
    same = (steps[..., :, None] == steps[..., None, :]) & valid[..., None, :]  # [B, nb, j, k]
    earlier = torch.ones(block_size, block_size, dtype=torch.bool).tril(-1)  # k < j
    # a token's round is a block's "first occurrence" unless an earlier valid token has the same round
    first = valid & ~(same & earlier).any(-1)
    below = (steps[..., None, :] < steps[..., :, None]) & first[..., None, :]  # distinct rounds below mine
    rank = below.sum(-1).masked_fill(~valid, -1)
    return rank.view(bsz, -1)[:, :alen]


def all_round_states(result: RolloutResult, block_size: int, mask_token_id: int,
                     keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Every round of every block (``loss.state_selection="all_rounds"``): ``(source [M], xt [M, A])``.

    Row ``m`` is the state of answer ``source[m]`` in its round ``r``: token ``i`` is revealed iff its
    commit rank in its block (``commit_ranks``) is below ``r``. Rows come answer by answer, rounds in
    order. ``keep`` ``[B, A]`` (default: the valid tokens) are the tokens that may carry loss: a round
    in which none of them is masked is dropped, except that an answer with no such round keeps its
    first one, so every answer has a row (it then carries no loss).
    """
    _check_result(result)
    keep = result.answer_valid if keep is None else keep & result.answer_valid
    ranks = commit_ranks(result, block_size)
    bsz, alen = ranks.shape
    rounds = torch.arange(block_size)
    masked = ranks[:, None, :] >= rounds[None, :, None]  # [B, R, A]: masked in round r (never padding)
    useful = (masked & keep[:, None, :]).any(-1)  # [B, R]
    useful[:, 0] |= ~useful.any(-1)
    source, round_index = useful.nonzero(as_tuple=True)
    revealed = result.answer_valid[source] & ~masked[source, round_index]
    xt = torch.where(revealed, result.answer_ids[source], torch.full_like(result.answer_ids[source], mask_token_id))
    return source, xt


def forward_mask(x0: Tensor, valid: Tensor, block_size: int, generator: torch.Generator, mask_token_id: int,
                 eps: float = 1e-3, per: str = "block") -> Tuple[Tensor, Tensor]:
    """MDLM/BD3LM forward corruption: ``(xt, t)``, both ``[B, A]``.

    ``per="sequence"`` (paper eq. 2 and 6) draws one ``u ~ U(0, 1)`` per row, ``per="block"`` one per
    block of ``block_size`` answer tokens; each valid token is then masked independently with
    probability ``t = eps + (1 - eps) u`` (LLaDA's floor keeps 1/t finite), and ``t`` is repeated
    over the tokens it applies to.
    """
    if x0.shape != valid.shape or valid.dtype != torch.bool or x0.dim() != 2:
        raise ValueError(f"x0 {tuple(x0.shape)} and bool valid {tuple(valid.shape)} must be one [B, A] shape")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
    if per not in NOISE_LEVELS:
        raise ValueError(f"unknown noise level {per!r}; expected one of {NOISE_LEVELS}")
    bsz, alen = x0.shape
    if per == "sequence":
        t = (eps + (1.0 - eps) * torch.rand((bsz, 1), generator=generator)).expand(bsz, alen)
    else:
        num_blocks = -(-alen // block_size)
        u = torch.rand((bsz, num_blocks), generator=generator)
        t = (eps + (1.0 - eps) * u).repeat_interleave(block_size, dim=1)[:, :alen]
    masked = (torch.rand((bsz, alen), generator=generator) < t) & valid
    return torch.where(masked, torch.full_like(x0, mask_token_id), x0), t.contiguous()


def random_mask_states(result: RolloutResult, generator: torch.Generator, mask_token_id: int,
                       block_size: int = 4, per: str = "block", eps: float = 1e-3) -> Tensor:
    """OPDLM_off / off-policy KD: xt ``[B, A]`` by forward random masking of the final answer."""
    _check_result(result)
    xt, _ = forward_mask(result.answer_ids, result.answer_valid, block_size, generator, mask_token_id, eps, per)
    return xt


def partially_masked_share(xt: Tensor, supervised: Tensor, valid: Tensor, block_size: int, mask_token_id: int) -> float:
    """Share of the supervised tokens that sit in blocks holding both masked and revealed tokens
    (the rest sit in fully masked blocks). Blocks are counted from the first answer token."""
    if not bool(supervised.any()):
        return float("nan")
    bsz, alen = xt.shape
    pad = (-alen) % block_size

    def blocks(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=False).view(bsz, -1, block_size)

    masked = blocks((xt == mask_token_id) & valid)
    revealed = blocks((xt != mask_token_id) & valid)
    partial = (masked.any(-1) & revealed.any(-1))[..., None].expand(-1, -1, block_size).reshape(bsz, -1)[:, :alen]
    return float((supervised & partial).sum()) / float(supervised.sum())
