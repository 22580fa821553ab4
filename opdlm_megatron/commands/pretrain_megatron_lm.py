"""``opdlm-pretrain-megatron-lm``: OPD inside Megatron-LM's ``pretrain()`` (``megatron_lm/``).

    torchrun --nproc_per_node=8 $(which opdlm-pretrain-megatron-lm) --opd-student CKPT \\
        --tensor-model-parallel-size 2 --global-batch-size 8 --micro-batch-size 1 --train-iters 160 \\
        --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --save RUN --load RUN [Megatron-LM flags ...]

Takes every Megatron-LM ``pretrain`` flag plus the OPD group below; the architecture comes from the
student's ``opdlm_model_config.json`` (contradicting model flags are refused). One run writes a
``--save`` directory at a time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .base import refuse_bad_input

PROGRAM = "opdlm-pretrain-megatron-lm"


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        from ..integrations.megatron_lm.flags import add_opd_args

        parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
        add_opd_args(parser)
        parser.print_help()
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def run() -> None:
        from ..integrations.megatron_lm import run as pretrain

        pretrain(argv)

    refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    main()
