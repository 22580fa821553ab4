"""``opd``: on-policy distillation of the student's own block-diffusion states (paper, Algorithm 1).

The student rolls out answers with its sampler; one non-terminal state of each trajectory
(``loss.state_selection="trajectory"``; ``"block"`` picks one per block, as the public code) is
supervised at every masked position by the frozen ARLM's ``p(. | prompt, x0_<i)``, with w(t) = 1.
"""

from __future__ import annotations

from .. import states
from .base import Objective, masked_state_batch, register_objective


@register_objective
class OnPolicyDistillation(Objective):
    name = "opd"
    answers = "student"
    distill = True
    summary = "paper: states of the student's own trajectory, teacher targets"

    def build(self, answers, generator, ctx):
        xt = states.select_states(answers, ctx.state_selection, generator, ctx.mask_token_id, block_size=ctx.block_size)
        return masked_state_batch(answers, xt, ctx, distill=True)
