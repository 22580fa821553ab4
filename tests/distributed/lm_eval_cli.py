"""torchrun script: opdlm-lm-eval with the arguments given (rank 0 drives lm-eval, rank 1 follows)."""

import sys

from opdlm_megatron.commands.lm_eval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
