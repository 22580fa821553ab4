"""torchrun script: opdlm-eval with the arguments given (TP/PP across the ranks)."""

import sys

from opdlm_megatron.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
