"""``opdlm-quantize``: post-training quantization of a student checkpoint with NVIDIA ModelOpt.

    opdlm-quantize --checkpoint DIR --prompts FILE.jsonl --out DIR --format {fp8,int8_sq,nvfp4} \\
        [--num-prompts 512] [--block-size 4] [--threshold 0.9 | --tokens-per-step 1] [--max-new-tokens 256] \\
        [--chat-template] [--tp 1 --pp 1]

The student decodes the calibration prompts (each line ``{"prompt": ...}`` or ``{"messages": ...}``, as
``opdlm-generate`` reads them) with the given decoding rule; ModelOpt sets every quantizer's range from the
forwards of that decoding, i.e. from the block-diffusion states the student meets when it serves
(``rollout/calibration.py``). The output is a checkpoint like the input (any TP/PP on load, its tokenizer
copied) whose config records the format: ``opdlm-eval``, ``opdlm-generate``, the lm-eval model and the HF
export read it as a quantized student. ``nvfp4`` runs on CUDA GPUs only. Runs single-process or under
``torchrun`` (``-m opdlm_megatron.quantize``, TP/PP).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..config.choices import QUANT_FORMATS
from ..rollout.config import CONFIDENCES
from ..runtime.console import setup_console
from ..runtime.outputs import check_output
from .base import add_layout_arguments, argument_parser, decode_config_from_flags, refuse_bad_input
from .generate import add_chat_arguments

PROGRAM = "opdlm-quantize"


def run(args) -> None:
    """Quantizes ``args.checkpoint`` calibrated on decoding ``args.prompts`` and saves it to ``args.out``."""
    from transformers import AutoTokenizer

    from ..checkpoint.model import build_from_checkpoint, is_checkpoint, load_model_config, save_model_checkpoint
    from ..checkpoint.tokenizer import copy_tokenizer_files
    from ..model.quantization import quantization_recipe
    from ..rollout.calibration import quantize_on_rollouts
    from ..runtime.platform import initialize_runtime, resolve_device
    from .generate import encode_prompt, read_prompts

    decode = decode_config_from_flags(max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                                      threshold=args.threshold, tokens_per_step=args.tokens_per_step,
                                      confidence=args.confidence)
    for flag, value in (("--batch-size", args.batch_size), ("--num-prompts", args.num_prompts)):
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    # what this machine cannot run, and ModelOpt's absence, are refused before anything is loaded
    quantization_recipe(args.format, resolve_device(args.device).type)
    if not is_checkpoint(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a model checkpoint "
                                "(needs opdlm_model_config.json and the dist-checkpoint files)")
    source_format = load_model_config(args.checkpoint).quantization
    if source_format is not None:
        raise ValueError(f"--checkpoint {args.checkpoint} is already quantized ({source_format}); quantize the "
                         f"unquantized student it came from")
    tokenizer_dir = args.tokenizer or os.path.join(args.checkpoint, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
    check_output(args.out, "--out", "dir", [("--checkpoint", args.checkpoint), ("--prompts", args.prompts),
                                            ("--tokenizer", tokenizer_dir)], replaces=True)
    records = read_prompts(args.prompts)[:args.num_prompts]
    if not records:
        raise ValueError(f"--prompts {args.prompts} holds no prompt")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = [encode_prompt(tokenizer, r, args.chat_template, args.enable_thinking) for r in records]

    with initialize_runtime(args.tp, args.pp, device=args.device, seed=0) as runtime:
        model, config = build_from_checkpoint(args.checkpoint, "student")
        if decode.eos_token_ids is None and not config.eos_token_ids and tokenizer.eos_token_id is not None:
            decode.eos_token_ids = [tokenizer.eos_token_id]
        quantize_on_rollouts(model, config, args.format, prompts, decode, args.batch_size)

        def with_tokenizer(tmp: str) -> None:
            if runtime.rank == 0:
                copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, "tokenizer"))

        save_model_checkpoint(model, args.out, config, write_extra_files=with_tokenizer)
        if runtime.rank == 0:
            print(f"{PROGRAM}: {args.format} student calibrated on {len(prompts)} prompts -> {args.out}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the student checkpoint to quantize")
    parser.add_argument("--prompts", required=True, help="JSONL calibration prompts (as opdlm-generate reads)")
    parser.add_argument("--out", required=True, help="the quantized checkpoint's directory")
    parser.add_argument("--format", required=True, choices=QUANT_FORMATS,
                        help="fp8: FP8 E4M3 per tensor; int8_sq: INT8 SmoothQuant; nvfp4: NVFP4 (CUDA only)")
    parser.add_argument("--num-prompts", type=int, default=512, help="calibrate on the first N prompts")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: CHECKPOINT/tokenizer)")
    parser.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, default=0.9, help="the decoding the student will serve with")
    rule.add_argument("--tokens-per-step", type=int, default=None)
    parser.add_argument("--confidence", choices=CONFIDENCES, default="probability")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    add_chat_arguments(parser)
    add_layout_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)
    refuse_bad_input(PROGRAM, lambda: run(args))


if __name__ == "__main__":
    main()
