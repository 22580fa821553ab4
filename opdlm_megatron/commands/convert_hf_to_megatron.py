"""``opdlm-convert-hf-to-megatron``: a HF decoder checkpoint (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral;
safetensors) as an opdlm-megatron checkpoint with a ``[MASK]`` token, at any TP/PP/EP (torchrun for more than one
rank; the checkpoint itself loads at any layout).

    opdlm-convert-hf-to-megatron --hf-dir HF --out CKPT [--tp 2 --pp 2 --ep 8] [--block-size 4]

Everything that can be wrong with the input is checked before the model is built; ``--out`` appears
whole or not at all, and may not be, contain or lie inside ``--hf-dir``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from ..config.choices import DTYPE_CHOICES
from ..runtime.console import setup_console
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-convert-hf-to-megatron"


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size (mixture-of-experts models: each rank reads its own experts)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES)
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="row of [MASK]: an unused row or vocab_size (append). Default: the tokenizer's own "
                             "mask token; else the first unused row when the checkpoint has more rows than the "
                             "tokenizer has tokens (Qwen3: 151669); else appended at vocab_size. A [MASK] row "
                             "without a trained embedding is always initialised to the mean token row.")
    parser.add_argument("--add-mask-token", action="store_true",
                        help="accepted for compatibility: every conversion places and initialises [MASK]")
    parser.add_argument("--block-size", type=int, default=None, help="student block size to record")
    parser.add_argument("--logit-shift", action="store_true", default=None, help="record a Dream-style logit shift")
    parser.add_argument("--transformer-impl", default=None, choices=["local", "transformer_engine"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)
    overrides = {key: value for key, value in (("block_size", args.block_size), ("logit_shift", args.logit_shift),
                                               ("transformer_impl", args.transformer_impl)) if value is not None}

    def run() -> int:
        from ..tools.convert_hf_to_megatron import convert

        convert(args.hf_dir, args.out, args.tp, args.pp, args.dtype, args.add_mask_token, args.overwrite,
                args.mask_token_id, ep=args.ep, **overrides)
        return 0

    return refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    raise SystemExit(main())
