"""``opd``: on-policy distillation of the student's own block-diffusion states (paper, Algorithm 1).

The student rolls out answers with its sampler; the states of its trajectories chosen by
``loss.state_selection`` are supervised at every masked position by the frozen ARLM's
``p(. | prompt, x0_<i)``, with w(t) = 1: ``trajectory`` (Algorithm 1: one round of each trajectory),
``block`` (one round of each block; every published run script of the authors) or ``all_rounds``
(every round of every block, one row per round; the default of the authors' config), see ``states.py``.
"""

from __future__ import annotations

from .base import Objective, register_objective, trajectory_batch


@register_objective
class OnPolicyDistillation(Objective):
    name = "opd"
    answers = "student"
    distill = True
    summary = "paper: states of the student's own trajectory, teacher targets"

    def build(self, answers, generator, ctx):
        return trajectory_batch(answers, generator, ctx)
