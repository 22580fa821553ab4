"""``opdlm-eval``: task evaluation of a block-diffusion student against its AR teacher.

    opdlm-eval --student CKPT [--teacher CKPT] --task basic_arithmetic \\
        --task-options '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}' \\
        --num-samples 200 --threshold 0.9 [--sweep] --out runs/eval
    opdlm-eval --student CKPT --task math_jsonl --data gsm8k_test.jsonl --extract last_number --out runs/eval
    torchrun --nproc-per-node 2 -m opdlm_megatron.evaluate --student CKPT --pp 2 ...

Tasks: a reasoning-gym dataset by name (its own difficulty options and scorer), ``math_jsonl``
(``question``/``answer`` records; last-number or ``\\boxed{}`` extraction), ``jsonl`` (``prompt``/
``reference``; exact or normalised match). The student is decoded by the rollout engine with the
given rule (threshold ``--threshold`` or static ``--tokens-per-step``, block size, temperature; with
``--seeds N`` when sampling); the teacher (default: the student checkpoint itself, i.e. its teacher
when it is a fresh conversion) greedily and causally, on the same prompts. ``--sweep`` adds the
accuracy-TPF curve over tau in {0.5, 0.7, 0.9, 0.95}, static k in {1, 2}, Fast-dLLM's factor rule
(f = 1), the entropy-bounded rule (budget 0.5) and dInfer's hierarchical rule (low threshold 0.4), its PNG and the area under it (AUP).

Writes ``samples.jsonl`` (one record per answer) and ``summary.json`` (accuracy +- standard error,
tokens per forward, forwards per answer, answer tokens/s, mean answer length, share hitting the
length limit, teacher agreement) to ``--out``; prints a table. Bad input gets one line naming it
and exit code 2.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..eval import scoring
from ..eval.tasks import FILE_TASKS
from ..runtime.console import setup_console
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser(PROGRAM, __doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=__doc__)
    p.add_argument("--student", required=True, help="opdlm-megatron checkpoint of the block-diffusion student")
    p.add_argument("--teacher", default=None, help="AR checkpoint decoded causally (default: --student)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher (no agreement numbers)")
    p.add_argument("--task", required=True,
                   help=f"a reasoning-gym dataset (basic_arithmetic, chain_sum, gsm_symbolic, ...) or one of {FILE_TASKS}")
    p.add_argument("--data", default=None, help="JSONL file for math_jsonl / jsonl")
    p.add_argument("--task-options", default="{}", help="JSON of reasoning-gym dataset options (difficulty)")
    p.add_argument("--num-samples", type=int, default=None, help="items (reasoning-gym default 100; files: all)")
    p.add_argument("--data-seed", type=int, default=0, help="reasoning-gym dataset seed")
    p.add_argument("--extract", default="auto", choices=scoring.EXTRACTIONS)
    p.add_argument("--match", default="normalized", choices=scoring.MATCHES)
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--reference-field", default="reference")
    p.add_argument("--few-shot", type=int, default=0)
    p.add_argument("--system-prompt", default=None)
    template = p.add_mutually_exclusive_group()
    template.add_argument("--chat-template", dest="chat_template", action="store_true", default=True)
    template.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    p.add_argument("--enable-thinking", action="store_true")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, default=None, help="confidence threshold tau (default 0.9)")
    rule.add_argument("--tokens-per-step", type=int, default=None, help="static rule: k tokens per step")
    rule.add_argument("--factor", type=float, default=None, help="Fast-dLLM factor rule with this f")
    rule.add_argument("--entropy-budget", type=float, default=None, help="entropy-bounded rule with this budget")
    rule.add_argument("--hierarchical", type=float, default=None, metavar="LOW",
                      help="dInfer's hierarchical rule with this low threshold (high threshold 0.9)")
    p.add_argument("--sweep", action="store_true", help="also tau in {0.5,0.7,0.9,0.95}, k in {1,2}, factor f=1 "
                                                        "entropy budget 0.5 and hierarchical low 0.4")
    p.add_argument("--block-size", type=int, default=None, help="default: the student's")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=1, help="sampling seeds (with --temperature > 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: STUDENT/tokenizer)")
    p.add_argument("--out", required=True, help="output directory (samples.jsonl, summary.json)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> int:
        from ..eval.evaluation import format_table, validate
        from ..eval.evaluation import run as evaluate
        from ..eval.tasks import load_task

        spec = validate(args)
        load_task(spec)  # bad task names, files and fields fail here, before any model is built
        summary = evaluate(args, spec)
        if summary is not None:
            print(format_table(summary))
            print(f"samples and summary in {args.out}")
        return 0

    return refuse_bad_input(PROGRAM, run)


if __name__ == "__main__":
    raise SystemExit(main())
