"""``python -m opdlm_megatron.evaluate`` (what torchrun launches for TP/PP evaluation): ``commands/evaluate.py``."""

import sys

from .commands.evaluate import main  # noqa: F401  (the entry point)

if __name__ == "__main__":
    sys.exit(main())
