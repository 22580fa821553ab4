"""``lift`` and ``lift2``: learnability-informed fine-tuning of a DLM (LIFT, arXiv 2605.22939) on
(prompt, response) data.

Per micro-batch (``micro_batch_size`` consecutive rows of the global batch, so every rank draws the
same values whatever the data-parallel layout):

1. ``t ~ U(0, 1)``, ``t <- (1 - eps) t + eps`` (``loss.mask_eps``); ``rho ~ U(rho_min, 1 - t)``
   (``U(0, 1 - t)`` when ``1 - t <= rho_min``).
2. A *superset* of the response is masked, each token with probability ``t + rho``; the prompt never.
3. The model being trained scores the superset, no grad: ``s_i = log p(x0_i | superset-masked input)``.
4. ``k = round(n_masked t / (t + rho))`` tokens per row stay masked, chosen by the micro-batch's mode:
   ``lift``: ``argmax([3t(1-t), t, 1-t])`` -> random / the k easiest (highest s) / the k hardest;
   ``lift2``: the easiest if ``t > 0.5`` else the hardest. The rest of the superset is unmasked.
5. Loss = ``sum_{i in S} CE_i / t`` over the number of response tokens in the batch (the MDLM
   estimator's normalisation); ``lift.weighting: cart`` replaces 1/t by the CART baseline's
   ``w_i = sum_{j unmasked} 0.5 p (1-p)^{|i-j|-1}`` (``lift.cart_p``).

Ties between equal scores go to the earlier position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config.checks import in_range, one_of
from .base import Objective, StateContext, kept_answer_tokens, masked_state_batch, register_objective

RANDOM, EASIEST, HARDEST = 0, 1, 2
VARIANTS = ("lift", "lift2")


LIFT_WEIGHTINGS = ("inverse_t", "cart")


@dataclass
class LIFTConfig:
    """``lift`` / ``lift2``: learnability-informed masking (``objectives/lift.py``). ``rho_min`` is
    the lower end of the superset's extra rate rho ~ U(rho_min, 1 - t); ``weighting`` "inverse_t"
    (LIFT's 1/t) or "cart" (the CART baseline's distance weights with ``cart_p``)."""

    rho_min: float = 0.1
    weighting: str = "inverse_t"
    cart_p: float = 0.1

    def __post_init__(self) -> None:
        one_of("lift.weighting", self.weighting, LIFT_WEIGHTINGS)
        in_range("lift.rho_min", self.rho_min, 0.0, 1.0, high_open=True)
        in_range("lift.cart_p", self.cart_p, 0.0, 1.0, low_open=True, high_open=True)


@dataclass
class LIFTDraws:
    """The uniforms one LIFT state is built from: ``t``/``rho`` per group ``[G]``, per token ``[B, A]``."""

    t: Tensor
    rho: Tensor
    token: Tensor
    pick: Tensor

    @classmethod
    def sample(cls, batch_size: int, answer_len: int, groups: int, generator: torch.Generator) -> "LIFTDraws":
        return cls(torch.rand(groups, generator=generator, dtype=torch.float64),
                   torch.rand(groups, generator=generator, dtype=torch.float64),
                   torch.rand(batch_size, answer_len, generator=generator, dtype=torch.float64),
                   torch.rand(batch_size, answer_len, generator=generator, dtype=torch.float64))


def noise_levels(u_t: Tensor, u_rho: Tensor, eps: float, rho_min: float):
    """``(t, rho)`` from uniforms (step 1)."""
    t = (1 - eps) * u_t + eps
    room = 1 - t
    low = torch.where(room <= rho_min, torch.zeros_like(t), torch.full_like(t, rho_min))
    return t, low + (room - low) * u_rho


def mode_for(t: Tensor, variant: str) -> Tensor:
    """The selection mode per group: RANDOM / EASIEST / HARDEST (step 4)."""
    if variant == "lift":
        return torch.stack([3 * t * (1 - t), t, 1 - t], -1).argmax(-1)
    if variant == "lift2":
        return torch.where(t > 0.5, torch.full_like(t, EASIEST, dtype=torch.long),
                           torch.full_like(t, HARDEST, dtype=torch.long))
    raise ValueError(f"unknown LIFT variant {variant!r}; expected one of {VARIANTS}")


def cart_weights(masked: Tensor, valid: Tensor, p: float) -> Tensor:
    """CART: ``w_i = sum_{j valid, unmasked} 0.5 p (1 - p)^{|i - j| - 1}`` for every position ``[B, S]``."""
    seq = masked.shape[1]
    distance = (torch.arange(seq)[:, None] - torch.arange(seq)[None]).abs().double()
    kernel = torch.where(distance > 0, 0.5 * p * (1 - p) ** (distance - 1), torch.zeros_like(distance))
    context = (valid & ~masked).double()
    return context @ kernel  # kernel is symmetric


def lift_selection(kept: Tensor, draws: LIFTDraws, group_of_row: Tensor, variant: str, eps: float,
                   rho_min: float, score: Callable[[Tensor], Tensor]):
    """``(selected [B, A] bool, superset [B, A] bool, t per row [B], mode per row [B])``.

    ``kept``: the response tokens that may be masked; ``score(superset)`` -> ``[B, A]`` the model's
    log-probabilities of the true tokens under the superset-masked input (read on the superset)."""
    t_group, rho_group = noise_levels(draws.t, draws.rho, eps, rho_min)
    t, rho = t_group[group_of_row], rho_group[group_of_row]
    superset = kept & (draws.token < (t + rho)[:, None])
    n_masked = superset.sum(-1)
    k = torch.round(n_masked.double() * t / (t + rho)).long()
    mode = mode_for(t_group, variant)[group_of_row]
    need_scores = bool(((mode != RANDOM) & (k > 0)).any())
    scores = score(superset).double() if need_scores else torch.zeros(kept.shape, dtype=torch.float64)
    # a sort key per mode (lower = chosen first); non-superset positions last; ties: earlier position
    key = torch.where(mode[:, None] == RANDOM, draws.pick,
                      torch.where(mode[:, None] == EASIEST, -scores, scores))
    key = torch.where(superset, key, torch.full_like(key, float("inf")))
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(kept.shape[1]).expand_as(order).contiguous())
    selected = superset & (rank < k[:, None])
    return selected, superset, t, mode


class _LIFTBase(Objective):
    answers = "dataset"
    distill = False
    variant = "lift"
    settings = LIFTConfig()  # the run's ``lift`` section after ``configure``

    def configure(self, cfg) -> None:
        self.settings = cfg.lift

    def build(self, answers, generator, ctx: StateContext):
        if ctx.score_student is None:
            raise ValueError(f"objective {self.name!r} scores the model being trained: StateContext.score_student "
                             "is required")
        settings = self.settings
        bsz, alen = answers.answer_ids.shape
        group_size = max(1, ctx.micro_batch_size)
        group_of_row = torch.arange(bsz) // group_size
        draws = LIFTDraws.sample(bsz, alen, int(group_of_row.max()) + 1, generator)
        kept = kept_answer_tokens(answers, ctx)
        mask_id = ctx.mask_token_id

        def score(superset: Tensor) -> Tensor:
            xt = torch.where(superset, torch.full_like(answers.answer_ids, mask_id), answers.answer_ids)
            return ctx.score_student(answers, xt, superset, split_data_parallel=True).log_prob

        selected, _, t, _ = lift_selection(kept, draws, group_of_row, self.variant, ctx.mask_eps,
                                            settings.rho_min, score)
        xt = torch.where(selected, torch.full_like(answers.answer_ids, mask_id), answers.answer_ids)
        t_tokens = t[:, None].expand(bsz, alen).float()
        if settings.weighting == "cart":
            weights = self._cart(answers, selected, settings.cart_p)
        else:
            weights = 1.0 / t_tokens
        return masked_state_batch(answers, xt, ctx, distill=False, weights=weights.float(), t=t_tokens)

    @staticmethod
    def _cart(answers, selected: Tensor, p: float) -> Tensor:
        valid = torch.cat([answers.prompt_valid, answers.answer_valid], 1)
        masked = torch.cat([torch.zeros_like(answers.prompt_valid), selected], 1)
        return cart_weights(masked, valid, p)[:, answers.prompt_ids.shape[1]:]


@register_objective
class LIFT(_LIFTBase):
    name = "lift"
    variant = "lift"
    summary = "dataset responses, superset masking, learnability-chosen masked tokens, 1/t CE (LIFT)"


@register_objective
class LIFT2(_LIFTBase):
    name = "lift2"
    variant = "lift2"
    summary = "LIFT with the two-mode rule: easiest if t > 0.5 else hardest"

