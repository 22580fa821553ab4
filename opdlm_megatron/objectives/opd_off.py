"""``opd_off``: on-policy answers, off-policy states (paper eq. 6, OPDLM_off).

The student's rollout gives x0 as for ``opd``, but the supervised state is a forward random masking
of x0 (one t per sequence by default, ``loss.t_sampling``), with the teacher's targets and w(t) = 1.
"""

from __future__ import annotations

from .. import states
from .base import Objective, masked_state_batch, register_objective


def random_state(answers, generator, ctx):
    """x0 masked at rate t ~ U(eps, 1) per sequence or block: ``(xt, t)``."""
    return states.forward_mask(answers.answer_ids, answers.answer_valid, ctx.block_size, generator,
                               ctx.mask_token_id, ctx.mask_eps, ctx.t_sampling)


@register_objective
class OnPolicyRandomMasking(Objective):
    name = "opd_off"
    answers = "student"
    distill = True
    summary = "student rollouts, random masking, teacher targets"

    def build(self, answers, generator, ctx):
        xt, t = random_state(answers, generator, ctx)
        return masked_state_batch(answers, xt, ctx, distill=True, t=t)
