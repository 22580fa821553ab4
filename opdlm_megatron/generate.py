"""Command line decoding with the block-diffusion student.

    python -m opdlm_megatron.generate --checkpoint DIR --prompts FILE.jsonl --out FILE.jsonl \\
        [--block-size 4] [--threshold 0.9 | --tokens-per-step 1] [--max-new-tokens N] \\
        [--temperature 0] [--chat-template]

Each input line is ``{"prompt": "..."}`` (or ``{"messages": [...]}`` for ``--chat-template``).
Each output line holds ``prompt``, ``completion``, ``completion_ids``, ``commit_step`` (the
denoising round of each completion token), ``num_rounds``, ``finished`` and
``num_forward_passes`` (of the batch the prompt was decoded in). The tokenizer is read from
``DIR/tokenizer``. Runs single-process or under ``torchrun`` (TP/PP); rank 0 writes the output.
"""

from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Sequence

from .cli import check_output
from .rollout.config import DecodeConfig


def read_prompts(path: str) -> List[dict]:
    """Reads a JSONL file of ``{"prompt": str}`` / ``{"messages": list}`` records (file and line named
    on a bad line)."""
    from .data import read_jsonl

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
    """Decodes the prompts of ``args`` (parsed by ``commands/generate.py``) and writes ``args.out``."""
    from transformers import AutoTokenizer

    from .checkpointing import build_from_checkpoint
    from .platform import initialize_runtime
    from .rollout import DiffusionRolloutEngine

    try:
        decode = DecodeConfig(
            max_new_tokens=args.max_new_tokens, block_size=args.block_size, threshold=args.threshold,
            tokens_per_step=args.tokens_per_step, steps_per_block=args.steps_per_block,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, confidence=args.confidence,
            seed=args.seed,
        )
    except ValueError as error:  # name the flag the user typed, not the dataclass field
        raise ValueError(re.sub(r"DecodeConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(error))) from None
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    from .checkpointing import is_checkpoint

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


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .commands.generate import main as command

    command(argv)


if __name__ == "__main__":
    main()
