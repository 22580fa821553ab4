"""The paper's claim in miniature, on CPU: on-policy distillation (OPD) vs masked diffusion and the
other conversions, at equal budgets of training tokens.

    python benchmarks/data_efficiency.py            # the full study (about an hour on 2 cores)
    python benchmarks/data_efficiency.py --quick    # every artefact in a few minutes (CI)

1. **Task**: multi-step addition with worked steps. The prompt ``<bos>12+7+30+5>`` is answered
   ``12+7>19;19+30>49;49+5>54;#54<eos>`` (3-6 terms of 1-2 digits: 18-60 answer tokens); a
   character-level vocabulary of 17 tokens. Correct means the number after ``#`` is the sum.
2. **Teacher**: a small AR model (4 layers, hidden 128, ~1M parameters) trained with the ``ar``
   objective on generated problems until >= 95% greedy accuracy on 200 held-out prompts (cached
   under ``~/.cache/opdlm/study``).
3. **Students**: the teacher's weights with block-causal attention (block 4), a [MASK] row set to
   the mean token embedding and the Dream-style logit shift; arms ``opd`` (Algorithm 1),
   ``opd_off``, ``kd_off``, ``sft`` (on cached teacher answers) and ``mdlm`` (on the task's data),
   ``opd_tcs`` / ``tcs`` (TCS-corrected teacher targets on OPD's states / on teacher answers) and
   ``lift`` (learnability-informed masking of the task's data), plus ``opd_noshift`` (the paper's
   student, without the shift), each trained from the same
   weights with the same optimizer and batch, and evaluated when its count of the paper's training
   tokens T (samples x generation length; dataset answers: their length) passes each budget.
4. **Evaluation** on 200 held-out prompts: accuracy at threshold 0.9 and at static 1 token per step
   (greedy), tokens per forward (TPF), the teacher's NLL of the student's answers, and the accuracy
   of the same weights decoded with blocks of one token (``acc_block1``: with the logit shift that
   is causal decoding, i.e. what training left of the AR model).

Outputs (``--out``, default ``benchmarks/results``): ``data_efficiency.csv``,
``data_efficiency_tokens.png`` (accuracy vs training tokens, one line per arm) and
``data_efficiency_tpf.png`` (accuracy vs TPF). The last line reads
``teacher_acc=A opd_acc=B opd_tpf=C mdlm_tokens_over_opd=D``: B and C are OPD's best accuracy at
threshold 0.9 over its budgets and the TPF there; D is how many times OPD's tokens (to first reach B)
masked diffusion needed to reach B (``inf`` if it never did within its budgets).

Deviations from the paper's Table 13, for a 2-core CPU, the same for every arm: training batch 32
(not 8; 128 tasks per rollout -> 4 steps), learning rate 3e-4 (a 1M-parameter model, not 1e-5),
final rollout length 64 (the answers' maximum) reached after 10 rollouts.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.checkpointing import build_from_checkpoint, is_checkpoint, save_model_checkpoint  # noqa: E402
from opdlm_megatron.data import Sample  # noqa: E402
from opdlm_megatron.eval.runner import ar_config, generate, student_decode, teacher_decode  # noqa: E402
from opdlm_megatron.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.rollout.config import DecodeConfig  # noqa: E402
from opdlm_megatron.teacher import FrozenTeacher  # noqa: E402
from opdlm_megatron.train_config import train_config_from_dict  # noqa: E402

TOKENS = ["<pad>", "<bos>", "<eos>"] + list("0123456789") + ["+", ">", ";", "#"]
ID = {t: i for i, t in enumerate(TOKENS)}
EOS, PAD = ID["<eos>"], ID["<pad>"]
MAX_ANSWER = 64

# arm -> (objective, logit shift). Every arm uses the Dream-style logit shift, with which these tiny
# students convert at all; "opd_noshift" is the paper's student (no shift), which does not learn the
# task within these budgets (a first full run: every no-shift arm <= 0.13 at 262k tokens, see BENCHMARKS.md).
ARMS = {"opd": ("opd", True), "opd_noshift": ("opd", False), "opd_off": ("opd_off", True),
        "kd_off": ("kd_off", True), "sft": ("sft", True), "mdlm": ("mdlm", True),
        "opd_tcs": ("opd_tcs", True), "tcs": ("tcs", True), "lift": ("lift", True)}


# ------------------------------------------------------------------------------------ the task
def problem(rng: random.Random, min_terms: int = 3, max_terms: int = 6) -> Tuple[Sample, int]:
    terms = [rng.randint(1, 99) for _ in range(rng.randint(min_terms, max_terms))]
    prompt = [ID["<bos>"]] + [ID[c] for c in "+".join(map(str, terms))] + [ID[">"]]
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}>{total + term};")
        total += term
    answer = [ID[c] for c in "".join(steps) + f"#{total}"] + [EOS]
    return Sample(prompt, answer), total


def final_answer(ids: List[int]) -> Optional[str]:
    text = "".join(TOKENS[i] for i in ids if 0 <= i < len(TOKENS) and i != EOS)
    return text.split("#")[-1] if "#" in text else None


def model_config(args, **changes) -> dict:
    return dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                num_attention_heads=4, num_query_groups=2, vocab_size=len(TOKENS), max_sequence_length=128,
                eos_token_ids=[EOS], pad_token_id=PAD, block_size=4, **changes)


# ------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    acc_tau: float
    tpf_tau: float
    acc_static: float
    tpf_static: float
    acc_block1: float  # the same weights decoded with blocks of 1 token: what is left of the AR model
    teacher_nll: float
    answer_tokens: float


def accuracy_of(gens, held) -> float:
    return sum(final_answer(g.ids) == str(total) for g, (_, total) in zip(gens, held)) / len(held)


def evaluate_student(model, config, teacher: FrozenTeacher, held, batch: int) -> Evaluation:
    from opdlm_megatron.answers import results_from_answers

    prompts = [s.prompt_ids for s, _ in held]
    base = DecodeConfig(max_new_tokens=MAX_ANSWER, eos_token_ids=[EOS], temperature=0.0)
    tau = generate(model, config, prompts, student_decode(base, None, config.block_size), batch)
    static = generate(model, config, prompts, student_decode(DecodeConfig(
        max_new_tokens=MAX_ANSWER, eos_token_ids=[EOS], tokens_per_step=1), None, config.block_size), batch)
    block1 = generate(model, config.replace(block_size=1), prompts, student_decode(DecodeConfig(
        max_new_tokens=MAX_ANSWER, eos_token_ids=[EOS], tokens_per_step=1), None, 1), batch)
    model.train()
    answers = results_from_answers(prompts, [g.ids for g in tau], [g.finished for g in tau], PAD)
    nll = teacher.answer_nll(answers.prompt_ids, answers.prompt_valid, answers.answer_ids, answers.answer_valid, batch)
    tokens = sum(len(g.ids) for g in tau)

    def tpf(gens):
        return sum(len(g.ids) for g in gens) / max(1, sum(g.forwards for g in gens))

    return Evaluation(accuracy_of(tau, held), tpf(tau), accuracy_of(static, held), tpf(static),
                      accuracy_of(block1, held), float(nll.sum()) / max(tokens, 1), tokens / len(held))


# ---------------------------------------------------------------------------------- teacher
def train_teacher(args, train: List[Sample], held, cache: str) -> Tuple[str, float]:
    """Trains (or loads) the AR teacher; returns its checkpoint and held-out greedy accuracy."""
    from opdlm_megatron.trainer import Trainer

    key = f"L{args.layers}H{args.hidden}S{args.teacher_steps}Q{int(args.quick)}"
    ckpt = os.path.join(cache, f"teacher_{key}")
    with initialize_runtime(device="cpu", seed=1) as runtime:
        if is_checkpoint(ckpt):
            model, config = build_from_checkpoint(ckpt, "teacher")
            gens = generate(model, ar_config(config), [s.prompt_ids for s, _ in held],
                            teacher_decode(DecodeConfig(max_new_tokens=MAX_ANSWER, eos_token_ids=[EOS])), args.eval_batch)
            return ckpt, accuracy_of(gens, held)
        cfg = train_config_from_dict(dict(
            objective="ar", seed=1, run_dir=tempfile.mkdtemp(prefix="study_teacher_"),
            train=dict(steps=args.teacher_steps, global_batch_size=64, micro_batch_size=64),
            model=dict(random_init=True, model_config=model_config(args)), parallel=dict(device="cpu"),
            data=dict(source="token_ids", path="generated"), rollout=dict(tasks_per_rollout=64),
            optim=dict(lr=2e-3, min_lr=2e-4, warmup_steps=min(50, args.teacher_steps)), checkpoint=dict(resume=False),
            logging=dict(progress_bar=False, teacher_nll=False)))
        trainer = Trainer(cfg, runtime, samples=train)
        accuracy, start = 0.0, time.time()
        for step in range(args.teacher_steps):
            trainer.train_step()
            if (step + 1) % args.teacher_eval_every == 0 or step + 1 == args.teacher_steps:
                gens = generate(trainer.student, ar_config(trainer.config), [s.prompt_ids for s, _ in held],
                                teacher_decode(DecodeConfig(max_new_tokens=MAX_ANSWER, eos_token_ids=[EOS])),
                                args.eval_batch)
                trainer.student.train()
                accuracy = accuracy_of(gens, held)
                log(f"teacher step {step + 1}: held-out accuracy {accuracy:.3f} ({time.time() - start:.0f} s)")
                if accuracy >= args.teacher_target:
                    break
        save_model_checkpoint(trainer.student, ckpt, trainer.config)
        trainer.close()
    return ckpt, accuracy


def log(message: str) -> None:
    print(message, flush=True)


def student_init(teacher_ckpt: str, directory: str, logit_shift: bool) -> str:
    """The teacher's weights as a block-diffusion student: block 4, [MASK] = mean token embedding."""
    with initialize_runtime(device="cpu", seed=2):
        model, config = build_from_checkpoint(teacher_ckpt, "student")
        config = config.replace(block_size=4, logit_shift=logit_shift)
        with torch.no_grad():
            emb = model.embedding.word_embeddings.weight
            emb[config.mask_token_id] = emb[:config.num_tokens].mean(0)
        save_model_checkpoint(model, directory, config)
    return directory


# ------------------------------------------------------------------------------------- arms
def run_arm(name: str, args, student_ckpt: str, teacher_ckpt: str, train: List[Sample], held,
            budgets: List[int], run_dir: str) -> List[dict]:
    from opdlm_megatron.trainer import Trainer

    objective, _ = ARMS[name]
    cfg = train_config_from_dict(dict(
        objective=objective, seed=3, run_dir=os.path.join(run_dir, name),
        train=dict(steps=10**7, global_batch_size=args.batch, micro_batch_size=args.batch),
        model=dict(student_checkpoint=student_ckpt, teacher_checkpoint=teacher_ckpt),
        parallel=dict(device="cpu"), data=dict(source="token_ids", path="generated", seed=4),
        rollout=dict(tasks_per_rollout=args.tasks_per_rollout, threshold=0.9, temperature=1.0,
                     teacher_max_new_tokens=MAX_ANSWER),
        curriculum=dict(min_length=16, max_length=MAX_ANSWER, warmup_rollouts=10),
        optim=dict(lr=args.lr, min_lr=args.lr, warmup_steps=5), checkpoint=dict(resume=False),
        tcs=dict(weight=args.tcs_weight, route_prob=args.tcs_route_prob, max_weight=args.tcs_max_weight),
        logging=dict(progress_bar=False, teacher_nll=False)))
    rows = []
    with initialize_runtime(device="cpu", seed=3) as rt:
        trainer = Trainer(cfg, rt, samples=train)
        teacher = trainer.teacher or FrozenTeacher.from_checkpoint(teacher_ckpt, trainer.config)
        start, wall = time.time(), 0.0
        train_s, refine_s = 0.0, 0.0  # time in train_step (no evaluation) and in refine_targets (TCS)
        pending = sorted(budgets)
        if pending and pending[0] == 0:
            pending.pop(0)
            rows.append(record(name, 0, 0, 0, evaluate_student(trainer.student, trainer.config, teacher, held,
                                                                 args.eval_batch), 0.0))
        while pending:
            step_start = time.time()
            metrics = trainer.train_step()
            train_s += time.time() - step_start
            refine_s += metrics.get("time/refine_targets", 0.0)
            tokens = trainer.counters["paper_tokens_total"]
            if tokens >= pending[0]:
                wall = time.time() - start
                evaluation = evaluate_student(trainer.student, trainer.config, teacher, held, args.eval_batch)
                rows.append(record(name, pending[0], tokens, trainer.step, evaluation, wall, train_s, refine_s))
                log(f"{name:9s} T={tokens:>9.0f} step {trainer.step:5d}: acc@0.9 {evaluation.acc_tau:.3f} "
                    f"TPF {evaluation.tpf_tau:.2f} acc@1/step {evaluation.acc_static:.3f} "
                    f"acc@block1 {evaluation.acc_block1:.3f} "
                    f"teacher NLL {evaluation.teacher_nll:.3f} loss {metrics['loss']:.4f} ({wall:.0f} s)"
                    + (f" routed {metrics['tcs_routed_share']:.2f} disagree {metrics['tcs_disagree_share']:.2f}"
                       if "tcs_routed_share" in metrics else ""))
                while pending and tokens >= pending[0]:
                    pending.pop(0)
        trainer.close()
    return rows


def record(arm, budget, tokens, step, e: Evaluation, wall, train_s=0.0, refine_s=0.0) -> dict:
    return dict(arm=arm, budget_tokens=budget, trained_tokens=int(tokens), steps=step, acc_tau09=e.acc_tau,
                tpf_tau09=e.tpf_tau, acc_static1=e.acc_static, tpf_static1=e.tpf_static, acc_block1=e.acc_block1,
                teacher_nll=e.teacher_nll, answer_tokens=e.answer_tokens, wall_s=round(wall, 1),
                s_per_step=round(train_s / max(step, 1), 3), refine_s_per_step=round(refine_s / max(step, 1), 3))


# ---------------------------------------------------------------------------------- summary
def tokens_to_reach(rows: List[dict], arm: str, accuracy: float) -> Optional[float]:
    hits = [r["trained_tokens"] for r in rows if r["arm"] == arm and r["budget_tokens"] > 0
            and r["acc_tau09"] >= accuracy - 1e-12]
    return min(hits) if hits else None


def plot(rows: List[dict], teacher_acc: float, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        pts = [(r["trained_tokens"], r["acc_tau09"]) for r in rows if r["arm"] == arm and r["budget_tokens"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=arm)
    ax.axhline(teacher_acc, color="gray", linestyle="--", label="teacher (AR)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens T (samples x generation length)")
    ax.set_ylabel("accuracy (threshold 0.9)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_efficiency_tokens.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        pts = [(r["tpf_tau09"], r["acc_tau09"]) for r in rows if r["arm"] == arm and r["budget_tokens"] > 0]
        if pts:
            ax.scatter(*zip(*pts), label=arm)
    ax.axhline(teacher_acc, color="gray", linestyle="--", label="teacher (AR, TPF 1)")
    ax.set_xlabel("tokens per forward (threshold 0.9)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_efficiency_tpf.png"), dpi=110)
    plt.close(fig)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything: checks that every artefact is produced")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--cache", default=os.path.join(os.environ.get("OPDLM_CACHE", os.path.expanduser("~/.cache/opdlm")),
                                                   "study"))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--budgets", default="0,32768,131072,262144,524288", help="token budgets of every arm but mdlm")
    p.add_argument("--mdlm-budgets", default="0,131072,524288,1048576,2621440")
    p.add_argument("--tcs-weight", type=float, default=1.0, help="lambda of the TCS arms")
    p.add_argument("--tcs-route-prob", type=float, default=0.1, help="routing probability where argmaxes agree")
    p.add_argument("--tcs-max-weight", type=float, default=None, help="cap of the TCS arms' lambda / pi weights")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--teacher-eval-every", type=int, default=250)
    p.add_argument("--teacher-target", type=float, default=0.95)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks-per-rollout", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=200)
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.teacher_steps, args.teacher_eval_every = 2, 64, 40, 40
        args.budgets, args.mdlm_budgets, args.held_out, args.tasks_per_rollout = "0,1024", "0,2048", 16, 32
        args.cache = tempfile.mkdtemp(prefix="study_quick_")
    return args


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    rng = random.Random(0)
    train = [problem(rng)[0] for _ in range(20000 if not args.quick else 2000)]
    held = [problem(random.Random(10**6 + i)) for i in range(args.held_out)]
    started = time.time()

    teacher_ckpt, teacher_acc = train_teacher(args, train, held, args.cache)
    log(f"teacher: {teacher_ckpt} held-out greedy accuracy {teacher_acc:.3f}")

    work = tempfile.mkdtemp(prefix="study_")
    inits = {shift: student_init(teacher_ckpt, os.path.join(work, f"student_shift{int(shift)}"), shift)
             for shift in sorted({ARMS[a][1] for a in args.arms.split(",")})}
    rows: List[dict] = []
    for arm in args.arms.split(","):
        budgets = [int(b) for b in (args.mdlm_budgets if arm == "mdlm" else args.budgets).split(",")]
        rows += run_arm(arm, args, inits[ARMS[arm][1]], teacher_ckpt, train, held, budgets, work)

    with open(os.path.join(args.out, "data_efficiency.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, teacher_acc, args.out)

    opd = [r for r in rows if r["arm"] == "opd" and r["budget_tokens"] > 0]
    best = max(opd, key=lambda r: (r["acc_tau09"], -r["trained_tokens"])) if opd else None
    ratio = float("nan")
    if best is not None:
        reached = tokens_to_reach(rows, "mdlm", best["acc_tau09"])
        opd_tokens = tokens_to_reach(rows, "opd", best["acc_tau09"])
        ratio = float("inf") if reached is None else reached / max(opd_tokens, 1)
    summary = dict(teacher_acc=teacher_acc, rows=rows, seconds=time.time() - started, args=vars(args))
    with open(os.path.join(args.out, "data_efficiency.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"total {time.time() - started:.0f} s; results in {args.out}")
    print(f"teacher_acc={teacher_acc:.3f} opd_acc={best['acc_tau09'] if best else float('nan'):.3f} "
          f"opd_tpf={best['tpf_tau09'] if best else float('nan'):.2f} mdlm_tokens_over_opd={ratio:.1f}")


if __name__ == "__main__":
    main()
