"""Task evaluation of converted diffusion LMs and their teachers (``opdlm-eval``, ``evaluate.py``)
and the lm-eval-harness model ``opdlm`` (``lm_eval_model.py``).

``tasks`` (reasoning-gym / JSONL tasks with scorers) -> ``runner`` (decode with the rollout
engine, score) -> ``metrics`` (accuracy +- SE, TPF, NFE, teacher agreement, AUP);
``likelihood`` scores continuations (exactly for AR models, by the block-diffusion bound for
students).
"""

# what a checkpoint is evaluated as: a block-diffusion student, or decoded causally (an AR model)
KINDS = ("student", "ar")
