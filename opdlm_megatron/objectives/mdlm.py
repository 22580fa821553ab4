"""``mdlm``: masked-diffusion conversion on the task's data (paper eq. 2; block diffusion, BD3LM).

x0 is the dataset's response; the state is a forward random masking and the loss the 1/t-weighted
cross entropy of the masked tokens, normalised by the answer tokens.
"""

from __future__ import annotations

from .base import Objective, diffusion_ce_batch, register_objective


@register_objective
class MaskedDiffusion(Objective):
    name = "mdlm"
    answers = "dataset"
    distill = False
    summary = "dataset responses, random masking, 1/t-weighted cross entropy"

    def build(self, answers, generator, ctx):
        return diffusion_ce_batch(answers, generator, ctx)
