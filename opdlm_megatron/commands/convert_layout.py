"""``opdlm-convert-layout``: re-save a model checkpoint in the other layout, this project's
(dist checkpoint + ``opdlm_model_config.json``) <-> Megatron-LM's (``release/`` + tracker file).

    opdlm-convert-layout --src student_ckpt --dst mlm_root --to megatron-lm   # for --pretrained-checkpoint
    opdlm-convert-layout --src mlm_root --dst student_ckpt --to opdlm         # e.g. an OPD run's --save

``--dst`` appears whole or not at all, and may not be, contain or lie inside ``--src``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from ..runtime.console import setup_console
from ..tools.convert_layout import LAYOUTS
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-convert-layout"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="checkpoint to read (either layout)")
    parser.add_argument("--dst", required=True, help="directory to create")
    parser.add_argument("--to", required=True, choices=LAYOUTS)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    args = parser.parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> int:
        from ..tools.convert_layout import convert_layout

        convert_layout(args.src, args.dst, args.to, args.overwrite)
        return 0

    return refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    raise SystemExit(main())
