"""``python -m opdlm_megatron.train`` (what torchrun and SLURM launch): ``commands/train.py``."""

import sys

from .commands.train import main, parse_args  # noqa: F401  (the entry point and its parser)

if __name__ == "__main__":
    sys.exit(main())
