#!/usr/bin/env python
"""Thin wrapper around ``opdlm_megatron.commands.prepare_smollm2`` (also the ``opdlm-prepare-smollm2`` console script)."""

import os
import sys

if __name__ == "__main__":
    # run from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from opdlm_megatron.commands.prepare_smollm2 import main

    sys.exit(main())
