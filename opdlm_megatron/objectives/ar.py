"""``ar``: plain causal next-token cross entropy on (prompt, response) data.

For training small autoregressive teachers (the data-efficiency study trains its own): the model
reads ``[prompt; response]`` causally and every response token (up to the first end-of-turn) is
predicted from the column before it. No masking, no teacher.
"""

from __future__ import annotations

from .base import Objective, SupervisedBatch, kept_answer_tokens, register_objective


@register_objective
class Autoregressive(Objective):
    name = "ar"
    answers = "dataset"
    distill = False
    summary = "dataset responses, causal next-token cross entropy"

    def build(self, answers, generator, ctx):
        kept = kept_answer_tokens(answers, ctx)
        return SupervisedBatch(answers, supervised=kept, normalizer=kept, distill=False, layout="causal")
