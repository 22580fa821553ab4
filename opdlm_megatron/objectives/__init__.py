"""Training objectives, one module each, registered by name (see ``base.py``).

| name | answers (x0) | supervised state xt | targets | weights |
| --- | --- | --- | --- | --- |
| ``opd`` (paper, Alg. 1) | student rollouts | a state of the student's own trajectory | teacher | 1 |
| ``opd_off`` (paper eq. 6) | student rollouts | random masking of the final answer | teacher | 1 |
| ``kd_off`` (paper 5.3) | cached teacher answers | random masking | teacher | 1 |
| ``sft`` (paper A.5) | cached teacher answers | random masking | answer tokens | 1/t |
| ``mdlm`` (eq. 2) | the dataset's responses | random masking | answer tokens | 1/t |
| ``ar`` | the dataset's responses | none: causal next-token prediction | answer tokens | 1 |
| ``opd_tcs`` (TCS on OPD) | student rollouts | a state of the student's own trajectory | teacher, TCS-corrected on routed positions | 1 |
| ``tcs`` | cached teacher answers | random masking | teacher, TCS-corrected on routed positions | 1 |
| ``lift`` / ``lift2`` (LIFT) | the dataset's responses | superset masking, then the k random / easiest / hardest | answer tokens | 1/t (or CART) |
"""

from . import ar, kd_off, lift, mdlm, opd, opd_off, sft, tcs  # noqa: F401,E402  (registers the built-in objectives)
from .base import (  # noqa: F401
                   ANSWER_SOURCES,
                   Objective,
                   StateContext,
                   SupervisedBatch,
                   TargetTools,
                   get_objective,
                   objective_names,
                   register_objective,
)
