#!/usr/bin/env python
"""Thin wrapper around ``opdlm_megatron.commands.convert_megatron_to_hf`` (also the ``opdlm-convert-megatron-to-hf`` console script)."""

import os
import sys

if __name__ == "__main__":
    # run from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from opdlm_megatron.commands.convert_megatron_to_hf import main

    sys.exit(main())
