"""Training objectives, one module each, registered by name (see ``base.py``).

| name | answers (x0) | supervised state xt | targets | weights |
| --- | --- | --- | --- | --- |
| ``opd`` (paper, Alg. 1) | student rollouts | a state of the student's own trajectory | teacher | 1 |
| ``opd_off`` (paper eq. 6) | student rollouts | random masking of the final answer | teacher | 1 |
| ``kd_off`` (paper 5.3) | cached teacher answers | random masking | teacher | 1 |
| ``sft`` (paper A.5) | cached teacher answers | random masking | answer tokens | 1/t |
| ``mdlm`` (eq. 2) | the dataset's responses | random masking | answer tokens | 1/t |
| ``ar`` | the dataset's responses | none: causal next-token prediction | answer tokens | 1 |
"""

from .base import (ANSWER_SOURCES, Objective, StateContext, SupervisedBatch, get_objective,  # noqa: F401
                   objective_names, register_objective)
from . import ar, kd_off, mdlm, opd, opd_off, sft  # noqa: F401,E402  (registers the built-in objectives)
