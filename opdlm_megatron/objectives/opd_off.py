"""``opd_off``: on-policy answers, off-policy states (paper eq. 6, OPDLM_off).

The student's rollout gives x0 as for ``opd``, but the supervised state is a forward random masking
of x0 (one t per sequence by default, ``loss.t_sampling``), with the teacher's targets and w(t) = 1.
"""

from __future__ import annotations

from .base import Objective, random_mask_batch, register_objective


@register_objective
class OnPolicyRandomMasking(Objective):
    name = "opd_off"
    answers = "student"
    distill = True
    summary = "student rollouts, random masking, teacher targets"

    def build(self, answers, generator, ctx):
        return random_mask_batch(answers, generator, ctx)
