"""``sft``: the block-diffusion (BD3LM) loss on the teacher's own answers (paper A.5, Table 10).

x0 is one full-length offline teacher answer per prompt, generated once and cached (as ``kd_off``);
the state is a forward random masking and the loss the 1/t-weighted cross entropy of the masked
tokens (eq. 2), normalised by the answer tokens.
"""

from __future__ import annotations


from .base import Objective, masked_state_batch, register_objective
from .opd_off import random_state


def diffusion_ce_batch(answers, generator, ctx):
    """Eq. (2): random masking with the 1/t weight on every masked token, hard labels."""
    xt, t = random_state(answers, generator, ctx)
    weights = 1.0 / t.clamp_min(1e-6)
    return masked_state_batch(answers, xt, ctx, distill=False, weights=weights, t=t)


@register_objective
class TeacherAnswerSFT(Objective):
    name = "sft"
    answers = "teacher"
    distill = False
    summary = "cached teacher answers, random masking, 1/t-weighted cross entropy"

    def build(self, answers, generator, ctx):
        return diffusion_ce_batch(answers, generator, ctx)


