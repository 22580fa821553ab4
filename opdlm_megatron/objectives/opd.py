"""``opd``: on-policy distillation of the student's own block-diffusion states (paper, Algorithm 1).

The student rolls out answers with its sampler; the states of its trajectories chosen by
``loss.state_selection`` are supervised at every masked position by the frozen ARLM's
``p(. | prompt, x0_<i)``, with w(t) = 1: ``trajectory`` (Algorithm 1: one round of each trajectory),
``block`` (one round of each block; every published run script of the authors) or ``all_rounds``
(every round of every block, one row per round; the default of the authors' config), see ``states.py``.
"""

from __future__ import annotations

from .. import states
from .base import Objective, kept_answer_tokens, masked_state_batch, register_objective


@register_objective
class OnPolicyDistillation(Objective):
    name = "opd"
    answers = "student"
    distill = True
    summary = "paper: states of the student's own trajectory, teacher targets"

    def build(self, answers, generator, ctx):
        if ctx.state_selection == "all_rounds":
            source, xt = states.all_round_states(answers, ctx.block_size, ctx.mask_token_id,
                                                 keep=kept_answer_tokens(answers, ctx))
            return masked_state_batch(answers.rows(source, trim=False), xt, ctx, distill=True, groups=source)
        xt = states.select_states(answers, ctx.state_selection, generator, ctx.mask_token_id, block_size=ctx.block_size)
        return masked_state_batch(answers, xt, ctx, distill=True)
