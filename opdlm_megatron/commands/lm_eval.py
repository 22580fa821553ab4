"""``opdlm-lm-eval``: lm-evaluation-harness tasks on an opdlm-megatron checkpoint (the lm-eval model
``opdlm``, ``eval/lm_eval_model.py``).

    opdlm-lm-eval --checkpoint CKPT --kind student --tasks gsm8k --output results.json
    torchrun --nproc-per-node 2 -m opdlm_megatron.commands.lm_eval --checkpoint CKPT --pp 2 --tasks ...

The checkpoint, the task names (with ``--include-path``) and ``--output`` are checked before the model
is loaded. Nothing is read from a hub: tasks over local files use ``dataset_path: json``.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..eval import KINDS
from ..runtime.console import setup_console
from ..runtime.outputs import check_output
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-lm-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="opdlm-megatron checkpoint directory")
    p.add_argument("--kind", default="student", choices=KINDS)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="directory of local task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--model-args", default="", help="extra OPDLMEvalModel arguments, k=v,k=v")
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def check(args) -> None:
    """Everything that can be checked before the model loads (one line each)."""
    from ..checkpoint.model import is_checkpoint

    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: directory not found")
    if not is_checkpoint(args.checkpoint):
        hf = os.path.isfile(os.path.join(args.checkpoint, "config.json"))
        raise ValueError(f"--checkpoint {args.checkpoint} is " + (
            "a HF model directory; convert it first: opdlm-convert-hf-to-megatron --hf-dir "
            f"{args.checkpoint} --out CKPT" if hf else "not an opdlm-megatron checkpoint"))
    for kv in (kv for kv in args.model_args.split(",") if kv):
        if "=" not in kv:
            raise ValueError(f"--model-args entry {kv!r} is not key=value")
    if args.include_path and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path {args.include_path}: directory not found")
    if args.output:
        check_output(args.output, "--output", "file", [("--checkpoint", args.checkpoint)])
    names = [t for t in args.tasks.split(",") if t]
    if not names:
        raise ValueError("--tasks is empty")
    from lm_eval.tasks import TaskManager

    known = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    unknown = sorted(set(names) - set(known.match_tasks(names)))
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}" + ("" if args.include_path else
                         "; local task YAMLs need --include-path DIR"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> int:
        check(args)
        from ..eval.lm_eval_model import run as evaluate

        return evaluate(args)

    return refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    raise SystemExit(main())
