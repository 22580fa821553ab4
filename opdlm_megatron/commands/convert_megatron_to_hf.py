"""``opdlm-convert-megatron-to-hf``: an opdlm-megatron checkpoint (any TP/PP it was saved at) as a HF
model directory: safetensors + ``config.json`` (with the student's ``[MASK]`` and block size) + tokenizer.

    opdlm-convert-megatron-to-hf --megatron-dir CKPT --out HF [--dtype bf16]

``--out`` appears whole or not at all, and may not be, contain or lie inside ``--megatron-dir``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from ..config.choices import DTYPE_CHOICES, QUANTIZED_EXPORTS
from ..runtime.console import setup_console
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-convert-megatron-to-hf"
MASK_TOKEN_CHOICES = {"auto": None, "keep": True, "drop": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True, help="opdlm-megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="HF model directory to create")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="export dtype (default: the checkpoint's)")
    parser.add_argument("--mask-token", default="auto", choices=sorted(MASK_TOKEN_CHOICES),
                        help="keep the appended [MASK] row: auto = if it was added with --add-mask-token")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 2GB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quantized-format", default="unified", choices=QUANTIZED_EXPORTS,
                        help="a quantized student: ModelOpt's unified deployment checkpoint (TensorRT-LLM, vLLM, SGLang) "
                             "or the fake-quantized HF model with ModelOpt's state (ModelOpt's HF loading path)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> int:
        from ..tools.convert_megatron_to_hf import export

        export(args.megatron_dir, args.out, args.dtype, MASK_TOKEN_CHOICES[args.mask_token], args.max_shard_size,
               args.overwrite, args.quantized_format)
        return 0

    return refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    raise SystemExit(main())
