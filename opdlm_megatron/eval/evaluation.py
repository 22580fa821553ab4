"""What ``opdlm-eval`` runs (usage: ``commands/evaluate.py``): check the inputs before any model loads
(``validate``), decode the task's prompts with the student under each decoding setting and with the
teacher causally (``run``), score them with the task's own scorer, and write ``samples.jsonl``,
``summary.json`` and, with ``--sweep``, the accuracy-TPF plot and its AUP (``write_outputs``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import List, Optional

from ..runtime.outputs import check_output
from .tasks import TaskSpec, task_options_from_json

logger = logging.getLogger(__name__)


class EvalInputError(ValueError):
    """A command-line value that cannot be used; the message names it."""


def _checkpoint(path: str, flag: str) -> str:
    from ..checkpoint.model import is_checkpoint

    if not os.path.isdir(path):
        raise EvalInputError(f"{flag} {path}: directory not found")
    if not is_checkpoint(path):
        raise EvalInputError(f"{flag} {path} is not an opdlm-megatron checkpoint (no metadata.json / "
                             "opdlm_model_config.json); convert HF models with opdlm-convert-hf-to-megatron")
    return path


def validate(args) -> TaskSpec:
    """Checks everything that can be checked before the runtime starts; returns the task spec."""
    for name in ("batch_size", "max_new_tokens", "seeds", "tp", "pp"):
        if getattr(args, name) < 1:
            raise EvalInputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise EvalInputError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if args.factor is not None and args.factor <= 0:
        raise EvalInputError(f"--factor must be > 0, got {args.factor}")
    if args.hierarchical is not None and not 0.0 <= args.hierarchical <= 1.0:
        raise EvalInputError(f"--hierarchical must lie in [0, 1], got {args.hierarchical}")
    if args.entropy_budget is not None and args.entropy_budget < 0:
        raise EvalInputError(f"--entropy-budget must be >= 0, got {args.entropy_budget}")
    if args.tokens_per_step is not None and args.tokens_per_step < 1:
        raise EvalInputError(f"--tokens-per-step must be positive, got {args.tokens_per_step}")
    if args.block_size is not None and args.block_size < 1:
        raise EvalInputError(f"--block-size must be positive, got {args.block_size}")
    if args.temperature < 0:
        raise EvalInputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.seeds > 1 and args.temperature == 0:
        raise EvalInputError("--seeds > 1 needs --temperature > 0 (greedy decoding gives one answer)")
    options = task_options_from_json(args.task_options)
    _checkpoint(args.student, "--student")
    if args.teacher and not args.no_teacher:
        _checkpoint(args.teacher, "--teacher")
    tokenizer_dir = args.tokenizer or os.path.join(args.student, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise EvalInputError(f"tokenizer directory not found: {tokenizer_dir} (pass --tokenizer DIR)")
    check_output(args.out, "--out", "dir", [("--student", args.student), ("--teacher", args.teacher),
                                            ("--data", args.data), ("--tokenizer", tokenizer_dir)])
    return TaskSpec(task=args.task, data=args.data, options=options, num_samples=args.num_samples,
                    seed=args.data_seed, extract=args.extract, match=args.match, few_shot=args.few_shot,
                    question_field=args.question_field, answer_field=args.answer_field,
                    prompt_field=args.prompt_field, reference_field=args.reference_field)


def encode(items, tokenizer, chat_template: bool = True, system_prompt: Optional[str] = None,
           enable_thinking: bool = False) -> List[List[int]]:
    """Prompt token ids of evaluation items, through the chat template or as plain text."""
    from ..data.samples import chat_prompt_ids

    if chat_template:
        return [chat_prompt_ids(tokenizer, item.messages(system_prompt), None, enable_thinking) for item in items]
    return [list(tokenizer(item.text(system_prompt), add_special_tokens=False)["input_ids"]) for item in items]


def settings(args):
    from .runner import FAST_RULES, PAPER_SWEEP, DecodeSetting

    if args.tokens_per_step is not None:
        main = DecodeSetting("k", args.tokens_per_step)
    elif args.factor is not None:
        main = DecodeSetting("factor", args.factor)
    elif args.entropy_budget is not None:
        main = DecodeSetting("eb", args.entropy_budget)
    elif args.hierarchical is not None:
        main = DecodeSetting("hier", args.hierarchical)
    else:
        main = DecodeSetting("tau", args.threshold if args.threshold is not None else 0.9)
    out = [main]
    if args.sweep:
        out += [DecodeSetting(rule, value) for rule, value in PAPER_SWEEP + FAST_RULES
                if DecodeSetting(rule, value) != main]
    return out


def run(args, spec: TaskSpec) -> Optional[dict]:
    """Decodes and scores; returns the summary on global rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from ..checkpoint.model import build_from_checkpoint, load_model_config
    from ..data.samples import load_tokenizer
    from ..rollout.config import DecodeConfig
    from ..runtime.platform import initialize_runtime
    from .metrics import accuracy_under_parallelism, summarize_run, teacher_agreement
    from .runner import ar_config, generate, score_generations, student_decode, teacher_decode
    from .tasks import load_task

    items = load_task(spec)
    tokenizer = load_tokenizer(args.tokenizer or os.path.join(args.student, "tokenizer"))
    prompts = encode(items, tokenizer, args.chat_template, args.system_prompt, args.enable_thinking)
    student_config = load_model_config(args.student)
    block = args.block_size or student_config.block_size
    rules = settings(args)
    seeds = list(range(args.seeds))
    teacher_path = None if args.no_teacher else (args.teacher or args.student)
    teacher_format = load_model_config(teacher_path).quantization if teacher_path else None
    if teacher_format is not None:
        # the teacher row is the AR model in its training precision; a quantized one is the thing measured
        flag = "--teacher" if args.teacher else "--student (the default teacher)"
        raise ValueError(f"{flag} {teacher_path} is quantized ({teacher_format}); "
                         f"the teacher must be the unquantized AR model: give --teacher, or --no-teacher")
    total = len(items) * (len(rules) * len(seeds) + (1 if teacher_path else 0))

    with initialize_runtime(args.tp, args.pp, device=args.device, seed=0) as runtime:
        rank0 = runtime.rank == 0
        bar = tqdm(total=total, desc="opdlm-eval", disable=not (rank0 and args.progress), dynamic_ncols=True)
        records: List[dict] = []
        base = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        teacher_ids = None
        if teacher_path:
            model, config = build_from_checkpoint(teacher_path, "teacher")
            eos = config.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            gens = generate(model, ar_config(config), prompts, teacher_decode(DecodeConfig(
                max_new_tokens=args.max_new_tokens, eos_token_ids=eos)), args.batch_size, bar)
            records += score_generations(items, gens, tokenizer, "teacher", "ar", 0)
            teacher_ids = [g.ids for g in gens]
            del model
        model, config = build_from_checkpoint(args.student, "student")
        if not config.eos_token_ids and tokenizer.eos_token_id is not None:
            base = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                eos_token_ids=[tokenizer.eos_token_id])
        student_first = None
        for setting in rules:
            for seed in seeds:
                decode = student_decode(dataclasses.replace(base, seed=seed), setting, block)
                gens = generate(model, config, prompts, decode, args.batch_size, bar)
                records += score_generations(items, gens, tokenizer, "student", setting.name, seed)
                if student_first is None:
                    student_first = [g.ids for g in gens]
        bar.close()
        if dist.get_world_size() > 1:
            dist.barrier()
    if not rank0:
        return None

    # everything that decides the prompts is recorded, so a summary says how to reproduce its numbers
    summary = {"task": spec.task, "task_options": spec.options, "data": spec.data, "data_seed": spec.seed,
               "few_shot": spec.few_shot, "system_prompt": args.system_prompt, "items": len(items),
               "student": args.student, "teacher": teacher_path, "block_size": block,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seeds": args.seeds,
               "chat_template": args.chat_template, "results": {}}
    if teacher_path:
        summary["results"]["teacher"] = summarize_run([r for r in records if r["model"] == "teacher"])
    for setting in rules:
        summary["results"][f"student {setting.name}"] = summarize_run(
            [r for r in records if r["model"] == "student" and r["setting"] == setting.name])
    summary["main_setting"] = f"student {rules[0].name}"
    if teacher_ids is not None:
        summary["teacher_agreement"] = teacher_agreement(student_first, teacher_ids)
    if args.sweep:
        points = [(summary["results"][f"student {s.name}"]["tokens_per_forward"],
                   summary["results"][f"student {s.name}"]["accuracy"]) for s in rules]
        summary["aup"] = accuracy_under_parallelism(points)
    write_outputs(args.out, records, summary, args.sweep)
    return summary


def write_outputs(out: str, records: List[dict], summary: dict, sweep: bool) -> None:
    os.makedirs(out, exist_ok=True)

    def atomic(name: str, text: str) -> None:
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))

    atomic("samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic("summary.json", json.dumps(summary, indent=2) + "\n")
    if sweep:
        plot_accuracy_vs_tpf(summary, os.path.join(out, "accuracy_tpf.png"))


def plot_accuracy_vs_tpf(summary: dict, path: str) -> None:
    """Accuracy against tokens per forward, one point per decoding setting (teacher at TPF 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in summary["results"].items():
        if name == "teacher":
            ax.axhline(r["accuracy"], color="gray", linestyle="--", label=f"teacher (AR) {r['accuracy']:.2f}")
            continue
        ax.errorbar(r["tokens_per_forward"], r["accuracy"], yerr=r["accuracy_se"], fmt="o", capsize=3)
        ax.annotate(name.replace("student ", ""), (r["tokens_per_forward"], r["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy")
    title = f"{summary['task']}: accuracy vs parallelism"
    if "aup" in summary:
        title += f" (AUP {summary['aup']:.2f})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def format_table(summary: dict) -> str:
    rows = [f"{'model':22s}{'accuracy':>16s}{'TPF':>7s}{'NFE':>8s}{'tok/s':>8s}{'len':>7s}{'limit':>7s}"]
    for name, r in summary["results"].items():
        rows.append(f"{name:22s}{r['accuracy']:>9.3f} ±{r['accuracy_se']:.3f}{r['tokens_per_forward']:>7.2f}"
                    f"{r['forwards_per_answer']:>8.1f}{r['answer_tokens_per_second']:>8.2f}"
                    f"{r['mean_answer_tokens']:>7.1f}{r['hit_length_limit']:>7.2f}")
    if "teacher_agreement" in summary:
        a = summary["teacher_agreement"]
        rows.append(f"teacher agreement ({summary['main_setting']}): exact {a['exact']:.3f}, "
                    f"edit similarity {a['edit_similarity']:.3f}")
    if "aup" in summary:
        rows.append(f"AUP (area under the accuracy-TPF frontier): {summary['aup']:.3f}")
    return "\n".join(rows)
