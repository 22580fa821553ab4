"""``opdlm-generate``: block-diffusion decoding of a prompts file with a student checkpoint.

    opdlm-generate --checkpoint DIR --prompts FILE.jsonl --out FILE.jsonl \\
        [--block-size 4] [--threshold 0.9 | --tokens-per-step 1] [--max-new-tokens N] \\
        [--temperature 0] [--chat-template]

Each input line is ``{"prompt": "..."}`` (or ``{"messages": [...]}`` for ``--chat-template``); each
output line holds ``prompt``, ``completion``, ``completion_ids``, ``commit_step`` (the denoising round
of each completion token), ``num_rounds``, ``finished`` and ``num_forward_passes``. The tokenizer is
read from ``DIR/tokenizer``. Runs single-process or under ``torchrun`` (``-m opdlm_megatron.generate``,
TP/PP); rank 0 writes the output.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import argument_parser, refuse_bad_input, setup_console
from ..rollout.config import CONFIDENCES

PROGRAM = "opdlm-generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="opdlm-megatron checkpoint directory")
    parser.add_argument("--prompts", required=True, help="JSONL input")
    parser.add_argument("--out", required=True, help="JSONL output")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: CHECKPOINT/tokenizer)")
    parser.add_argument("--block-size", type=int, default=None)
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, default=0.9)
    rule.add_argument("--tokens-per-step", type=int, default=None)
    parser.add_argument("--steps-per-block", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--confidence", choices=CONFIDENCES, default="probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chat-template", action="store_true")
    parser.add_argument("--enable-thinking", action="store_true",
                        help="let Qwen3-style chat templates open a thinking section (off by default, as in training)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> None:
        from ..generate import run as generate

        generate(args)

    refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    main()
