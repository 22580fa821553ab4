"""``sft``: the block-diffusion (BD3LM) loss on the teacher's own answers (paper A.5, Table 10).

x0 is one full-length offline teacher answer per prompt, generated once and cached (as ``kd_off``);
the state is a forward random masking and the loss the 1/t-weighted cross entropy of the masked
tokens (eq. 2), normalised by the answer tokens.
"""

from __future__ import annotations

from .base import Objective, diffusion_ce_batch, register_objective


@register_objective
class TeacherAnswerSFT(Objective):
    name = "sft"
    answers = "teacher"
    distill = False
    summary = "cached teacher answers, random masking, 1/t-weighted cross entropy"

    def build(self, answers, generator, ctx):
        return diffusion_ce_batch(answers, generator, ctx)
