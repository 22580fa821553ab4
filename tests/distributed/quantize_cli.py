"""torchrun script: ``opdlm-quantize`` with the given arguments (``--tp`` / ``--pp`` among them), as
``torchrun -m opdlm_megatron.quantize`` runs it."""

import sys

from opdlm_megatron.commands.quantize import main

if __name__ == "__main__":
    main(sys.argv[1:])
