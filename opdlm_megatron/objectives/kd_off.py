"""``kd_off``: off-policy distillation (paper 5.3): the teacher's soft targets on its own offline
answers under random masking.

x0 is one answer of the frozen teacher per prompt, generated once (greedy by default,
``rollout.teacher_temperature``; up to ``rollout.teacher_max_new_tokens``) and cached; the state is a
forward random masking of it, supervised with the teacher's distributions and w(t) = 1.
"""

from __future__ import annotations

from .base import Objective, random_mask_batch, register_objective


@register_objective
class OffPolicyDistillation(Objective):
    name = "kd_off"
    answers = "teacher"
    distill = True
    summary = "cached teacher answers, random masking, teacher targets"

    def build(self, answers, generator, ctx):
        return random_mask_batch(answers, generator, ctx)
