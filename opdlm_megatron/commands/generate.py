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
import json
import os
from typing import List, Optional, Sequence

from ..rollout.config import CONFIDENCES
from ..runtime.console import setup_console
from ..runtime.outputs import check_output
from .base import add_layout_arguments, argument_parser, decode_config_from_flags, refuse_bad_input

PROGRAM = "opdlm-generate"


def read_prompts(path: str) -> List[dict]:
    """Reads a JSONL file of ``{"prompt": str}`` / ``{"messages": list}`` records (file and line named
    on a bad line)."""
    from ..data.samples import read_jsonl

    records = []
    for number, record in read_jsonl(path):
        if not ("prompt" in record or "messages" in record):
            raise ValueError(f"{path}:{number}: each line needs a 'prompt' (or 'messages') field")
        records.append(record)
    return records


def encode_prompt(tokenizer, record: dict, chat_template: bool, enable_thinking: bool = False) -> List[int]:
    if chat_template:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False, enable_thinking=enable_thinking))
    if "prompt" not in record:
        raise ValueError("a record with only 'messages' needs --chat-template")
    return list(tokenizer(record["prompt"], add_special_tokens=False)["input_ids"])


def run(args) -> None:
    """Decodes the prompts of ``args`` and writes ``args.out`` (rank 0)."""
    from transformers import AutoTokenizer

    from ..checkpoint.model import build_from_checkpoint
    from ..rollout import DiffusionRolloutEngine
    from ..runtime.platform import initialize_runtime

    decode = decode_config_from_flags(
        max_new_tokens=args.max_new_tokens, block_size=args.block_size, threshold=args.threshold,
        tokens_per_step=args.tokens_per_step, steps_per_block=args.steps_per_block,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, confidence=args.confidence,
        seed=args.seed,
    )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    from ..checkpoint.model import is_checkpoint

    if not is_checkpoint(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a model checkpoint "
                                "(needs opdlm_model_config.json and the dist-checkpoint files)")
    tokenizer_dir = args.tokenizer or os.path.join(args.checkpoint, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
    check_output(args.out, "--out", "file", [("--checkpoint", args.checkpoint), ("--prompts", args.prompts),
                                             ("--tokenizer", tokenizer_dir)])
    records = read_prompts(args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = [encode_prompt(tokenizer, r, args.chat_template, args.enable_thinking) for r in records]

    with initialize_runtime(args.tp, args.pp, device=args.device, seed=args.seed) as runtime:
        model, config = build_from_checkpoint(args.checkpoint, "student")
        if decode.eos_token_ids is None and not config.eos_token_ids and tokenizer.eos_token_id is not None:
            decode.eos_token_ids = [tokenizer.eos_token_id]
        engine = DiffusionRolloutEngine(model, config)
        lines = []
        for start in range(0, len(encoded), args.batch_size):
            result = engine.generate(encoded[start:start + args.batch_size], decode)
            for row, record in enumerate(records[start:start + args.batch_size]):
                valid = result.answer_valid[row]
                ids = result.answer_ids[row][valid].tolist()
                lines.append(dict(
                    prompt=record.get("prompt", record.get("messages")),
                    completion=tokenizer.decode(ids, skip_special_tokens=True),
                    completion_ids=ids,
                    commit_step=result.commit_step[row][valid].tolist(),
                    num_rounds=int(result.num_rounds[row]),
                    finished=bool(result.finished[row]),
                    num_forward_passes=result.num_forward_passes,
                ))
        if runtime.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
            os.replace(tmp, args.out)


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
    add_chat_arguments(parser)
    add_layout_arguments(parser)
    return parser


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """How prompt records become token ids: ``--chat-template``, ``--enable-thinking``."""
    parser.add_argument("--chat-template", action="store_true")
    parser.add_argument("--enable-thinking", action="store_true",
                        help="let Qwen3-style chat templates open a thinking section (off by default, as in training)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)
    refuse_bad_input(PROGRAM, lambda: run(args))


if __name__ == "__main__":
    main()
