"""The paper's claims in miniature, on CPU (round two): on-policy distillation (OPD) with the authors'
state selections vs masked diffusion, SFT and off-policy KD, at equal budgets of training tokens.

    python benchmarks/data_efficiency.py            # the full study (hours on 2 cores; resumable)
    python benchmarks/data_efficiency.py --quick    # every artefact in a few minutes (CI)
    python benchmarks/data_efficiency.py --arms opd_all_rounds@lr=1e-4,mdlm@lr=1e-4   # more arms later

1. **Task**: multi-step addition with worked steps. The prompt ``<bos>12+7+30+5>`` is answered
   ``12+7>19;19+30>49;49+5>54;#54<eos>`` (3-6 terms of 1-2 digits: 18-60 answer tokens); a
   character-level vocabulary of 17 tokens. Correct means the number after ``#`` is the sum.
2. **Teacher**: a small AR model (4 layers, hidden 128, ~1M parameters) trained with the ``ar``
   objective on generated problems until >= 95% greedy accuracy on 200 held-out prompts (cached
   under ``--work``).
3. **Students**: the teacher's weights with block-causal attention (block 4), a [MASK] row set to
   the mean token embedding and the Dream-style logit shift (``opd_noshift``: the paper's student).
   Arms (``ARMS``): ``opd_all_rounds`` / ``opd_block`` / ``opd_trajectory`` (OPD with
   ``loss.state_selection`` all_rounds / block / trajectory), ``opd_off``, ``kd_off``, ``sft`` (on
   cached teacher answers), ``mdlm`` (on the task's data); ``opd_tcs``, ``tcs``, ``lift`` on request.
   Variants: ``ARM@lr=X`` (another learning rate), ``ARM@schedule`` (the rollout threshold held at
   0.9 for 150 rollouts, then lowered linearly to 0.7 by the end of the schedule, as the authors'
   config allows), ``ARM@from=SOURCE:T`` (warm-started from arm SOURCE's student at T tokens).
4. **One schedule for every arm** (``--lr``, not tuned per arm): AdamW, batch 32, 128 tasks per
   rollout (4 optimizer steps), warm-up 20 steps, then cosine to 0.1x over ``--decay-steps`` (2,000)
   optimizer steps: ~4.1M paper tokens for the arms that generate 64-token answers, ~2.7M for mdlm.
   Rollouts: threshold 0.9, temperature 1, curriculum 16 -> 64 tokens over 10 rollouts.
5. **Budgets**: every arm is evaluated when its paper tokens T (samples x generation length; mdlm:
   its answers' tokens) pass each of ``--budgets`` (to 2.6M); the OPD arms also at ``--opd-budgets``
   (4.2M). Each point is recorded at its paper T, supervised tokens, answer tokens and optimizer steps.
6. **Evaluation** on 200 held-out prompts, greedy: accuracy (+- SE) and tokens per forward (TPF) at
   threshold 0.9 and at one token per step; the same weights decoded with blocks of one token
   (``acc_block1``: with the logit shift that is causal decoding); the teacher's NLL of the student's
   answers; and the student's teacher-forced NLL of the *teacher's* answers decoded as AR (block 1:
   ``nll_ar``) and in the block layout with only the scored slot masked (``nll_block``): a drop in
   the first is forgetting, a gap between the two the change of attention mode.

Resumable: rows are appended to ``data_efficiency.csv`` as they land; an arm saves a training
checkpoint at every evaluated budget under ``--work`` and a rerun continues each arm from its last
one, skipping every (arm, budget) the CSV already holds. A machine without ``--work`` restarts an
unfinished arm from its start (the study is deterministic) and appends only the missing rows.

Outputs (``--out``, default ``benchmarks/results``): ``data_efficiency.csv``, ``data_efficiency.json``,
``data_efficiency_tokens.png`` (accuracy vs paper T and vs answer tokens), ``data_efficiency_tpf.png``
(accuracy vs TPF) and ``data_efficiency_static.png`` (one token per step vs threshold 0.9). The last
line reads ``teacher_acc=A opd_acc=B opd_tpf=C opd_static_drop=E sft_static_drop=F
mdlm_tokens_over_opd=D``: B, C are the best OPD arm's best accuracy at threshold 0.9 and the TPF there
(the arms without ``@``); E, F the accuracy at one token per step minus at threshold 0.9 at the final
budget of that arm and of ``sft``; D the paper tokens mdlm needed to reach B over the best OPD arm's
(``inf`` if it never did).
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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.checkpoint.model import build_from_checkpoint, is_checkpoint, save_model_checkpoint  # noqa: E402
from opdlm_megatron.data.samples import Sample  # noqa: E402
from opdlm_megatron.eval.runner import ar_config, generate, student_decode, teacher_decode  # noqa: E402
from opdlm_megatron.runtime.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.rollout.config import DecodeConfig  # noqa: E402
from opdlm_megatron.distill.teacher import FrozenTeacher  # noqa: E402
from opdlm_megatron.training.config_files import train_config_from_dict  # noqa: E402

TOKENS = ["<pad>", "<bos>", "<eos>"] + list("0123456789") + ["+", ">", ";", "#"]
ID = {t: i for i, t in enumerate(TOKENS)}
EOS, PAD = ID["<eos>"], ID["<pad>"]


@dataclass
class Limits:
    """Answer length and held-out size: set once from the command line (--max-answer, --held-out)."""

    max_answer: int = 64
    held_out: int = 200


LIMITS = Limits()
CSV_NAME = "data_efficiency.csv"


@dataclass(frozen=True)
class Arm:
    """An arm: the objective, the logit shift, config overrides, and (variants) a warm start."""

    objective: str
    shift: bool = True
    overrides: Dict[str, object] = field(default_factory=dict)
    lr: Optional[float] = None
    warm_start: Optional[Tuple[str, int]] = None  # (source arm, its paper tokens)


ARMS = {
    "opd_all_rounds": Arm("opd", overrides={"loss.state_selection": "all_rounds"}),
    "opd_block": Arm("opd", overrides={"loss.state_selection": "block"}),
    "opd_trajectory": Arm("opd", overrides={"loss.state_selection": "trajectory"}),
    "opd_noshift": Arm("opd", shift=False, overrides={"loss.state_selection": "trajectory"}),
    "opd_off": Arm("opd_off"), "kd_off": Arm("kd_off"), "sft": Arm("sft"), "mdlm": Arm("mdlm"),
    "opd_tcs": Arm("opd_tcs"), "tcs": Arm("tcs"), "lift": Arm("lift"),
}
DEFAULT_ARMS = "opd_all_rounds,mdlm,sft,opd_block,kd_off,opd_trajectory,opd_off"
OPD_ARMS = ("opd_all_rounds", "opd_block", "opd_trajectory")  # candidates for the best OPD arm


def arm_spec(name: str, decay_steps: int, tasks_per_step: int) -> Arm:
    """``ARM`` or ``ARM@lr=X`` / ``ARM@schedule`` / ``ARM@from=SOURCE:T`` (one variant)."""
    base, _, variant = name.partition("@")
    if base not in ARMS:
        raise SystemExit(f"data_efficiency.py: error: unknown arm {base!r}; known: {sorted(ARMS)}")
    arm = ARMS[base]
    if not variant:
        return arm
    key, _, value = variant.partition("=")
    overrides = dict(arm.overrides)
    if key == "lr":
        return Arm(arm.objective, arm.shift, overrides, lr=float(value))
    if key == "schedule":
        rollouts = decay_steps // tasks_per_step
        overrides["rollout.threshold_schedule"] = dict(final=0.7, hold_rollouts=min(150, rollouts // 2),
                                                        ramp_rollouts=max(1, rollouts - min(150, rollouts // 2)))
        return Arm(arm.objective, arm.shift, overrides)
    if key == "from":
        source, _, tokens = value.partition(":")
        return Arm(arm.objective, arm.shift, overrides, warm_start=(source, int(tokens)))
    raise SystemExit(f"data_efficiency.py: error: unknown variant {variant!r} of {base!r} (lr=X, schedule, from=ARM:T)")


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
    nll_ar: float  # teacher-forced NLL of the teacher's answers, decoded as AR (block 1)
    nll_block: float  # ... in the block layout, only the scored slot masked


def accuracy_of(gens, held) -> float:
    return sum(final_answer(g.ids) == str(total) for g, (_, total) in zip(gens, held)) / len(held)


_TEACHER_ANSWERS: Dict[str, object] = {}


def teacher_answers(teacher: FrozenTeacher, held, batch: int):
    """The teacher's greedy answers to the held-out prompts (decoded once per process)."""
    from opdlm_megatron.distill.answers import results_from_answers

    if "held" not in _TEACHER_ANSWERS:
        prompts = [s.prompt_ids for s, _ in held]
        gens = generate(teacher.model, ar_config(teacher.config), prompts,
                        teacher_decode(DecodeConfig(max_new_tokens=LIMITS.max_answer, eos_token_ids=[EOS])), batch)
        _TEACHER_ANSWERS["held"] = results_from_answers(prompts, [g.ids for g in gens], [g.finished for g in gens], PAD)
    return _TEACHER_ANSWERS["held"]


def forced_nll(model, config, answers, batch: int) -> Tuple[float, float]:
    """The student's per-token NLL of ``answers`` decoded as AR (blocks of one token) and in its block
    layout with only the scored slot masked (slot j of every block masked together: blocks only see the
    clean x0 of earlier blocks, so that equals masking each slot alone)."""
    from opdlm_megatron.objectives.scoring import StudentScorer

    valid = answers.answer_valid
    count = max(1, int(valid.sum()))
    masked_all = torch.full_like(answers.answer_ids, config.mask_token_id)
    as_ar = StudentScorer(model, config.replace(block_size=1), batch)(answers, masked_all, valid)
    scorer = StudentScorer(model, config, batch)
    slot = torch.arange(valid.shape[1])[None].expand_as(valid) % config.block_size
    block_lp = torch.zeros(valid.shape)
    for j in range(config.block_size):
        scored = valid & (slot == j)
        xt = torch.where(scored, masked_all, answers.answer_ids)
        block_lp += torch.where(scored, scorer(answers, xt, scored).log_prob, torch.zeros(()))
    return -float(as_ar.log_prob[valid].sum()) / count, -float(block_lp[valid].sum()) / count


def evaluate_student(model, config, teacher: FrozenTeacher, held, batch: int) -> Evaluation:
    from opdlm_megatron.distill.answers import results_from_answers

    prompts = [s.prompt_ids for s, _ in held]
    base = DecodeConfig(max_new_tokens=LIMITS.max_answer, eos_token_ids=[EOS], temperature=0.0)
    tau = generate(model, config, prompts, student_decode(base, None, config.block_size), batch)
    static = generate(model, config, prompts, student_decode(DecodeConfig(
        max_new_tokens=LIMITS.max_answer, eos_token_ids=[EOS], tokens_per_step=1), None, config.block_size), batch)
    block1 = generate(model, config.replace(block_size=1), prompts, student_decode(DecodeConfig(
        max_new_tokens=LIMITS.max_answer, eos_token_ids=[EOS], tokens_per_step=1), None, 1), batch)
    answers = results_from_answers(prompts, [g.ids for g in tau], [g.finished for g in tau], PAD)
    nll = teacher.answer_nll(answers.prompt_ids, answers.prompt_valid, answers.answer_ids, answers.answer_valid, batch)
    nll_ar, nll_block = forced_nll(model, config, teacher_answers(teacher, held, batch), batch)
    model.train()
    tokens = sum(len(g.ids) for g in tau)

    def tpf(gens):
        return sum(len(g.ids) for g in gens) / max(1, sum(g.forwards for g in gens))

    return Evaluation(accuracy_of(tau, held), tpf(tau), accuracy_of(static, held), tpf(static),
                      accuracy_of(block1, held), float(nll.sum()) / max(tokens, 1), tokens / len(held),
                      nll_ar, nll_block)


# ---------------------------------------------------------------------------------- teacher
def train_teacher(args, train: List[Sample], held, cache: str) -> Tuple[str, float]:
    """Trains (or loads) the AR teacher; returns its checkpoint and held-out greedy accuracy."""
    from opdlm_megatron.training.trainer import Trainer

    key = f"L{args.layers}H{args.hidden}S{args.teacher_steps}Q{int(args.quick)}"
    ckpt = os.path.join(cache, f"teacher_{key}")
    with initialize_runtime(device="cpu", seed=1) as runtime:
        if is_checkpoint(ckpt):
            model, config = build_from_checkpoint(ckpt, "teacher")
            gens = generate(model, ar_config(config), [s.prompt_ids for s, _ in held],
                            teacher_decode(DecodeConfig(max_new_tokens=LIMITS.max_answer, eos_token_ids=[EOS])),
                            args.eval_batch)
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
                                teacher_decode(DecodeConfig(max_new_tokens=LIMITS.max_answer, eos_token_ids=[EOS])),
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
    if is_checkpoint(directory):
        return directory
    with initialize_runtime(device="cpu", seed=2):
        model, config = build_from_checkpoint(teacher_ckpt, "student")
        config = config.replace(block_size=4, logit_shift=logit_shift)
        with torch.no_grad():
            emb = model.embedding.word_embeddings.weight
            emb[config.mask_token_id] = emb[:config.num_tokens].mean(0)
        save_model_checkpoint(model, directory, config)
    return directory


# ------------------------------------------------------------------------------------- arms
def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def arm_config(name: str, arm: Arm, args, student_ckpt: str, teacher_ckpt: str, run_dir: str):
    lr = arm.lr if arm.lr is not None else args.lr
    data = dict(
        objective=arm.objective, seed=3, run_dir=run_dir,
        train=dict(steps=10**7, global_batch_size=args.batch, micro_batch_size=args.batch),
        model=dict(student_checkpoint=student_ckpt, teacher_checkpoint=teacher_ckpt),
        parallel=dict(device="cpu"), data=dict(source="token_ids", path="generated", seed=4),
        rollout=dict(tasks_per_rollout=args.tasks_per_rollout, threshold=0.9, temperature=1.0,
                     teacher_max_new_tokens=LIMITS.max_answer),
        curriculum=dict(min_length=min(16, LIMITS.max_answer), max_length=LIMITS.max_answer, warmup_rollouts=10),
        optim=dict(lr=lr, min_lr=0.1 * lr, warmup_steps=args.warmup_steps, decay_steps=args.decay_steps),
        checkpoint=dict(resume=True, keep_last=1),
        logging=dict(progress_bar=False, teacher_nll=False))
    overrides = [f"{k}={json.dumps(v)}" for k, v in arm.overrides.items()]
    return train_config_from_dict(data, overrides)


def run_arm(name: str, args, inits: Dict[bool, str], teacher_ckpt: str, train: List[Sample], held,
            budgets: List[int], work: str, on_row, record: bool = True) -> None:
    """Trains arm ``name`` from its last checkpoint under ``work`` and calls ``on_row`` at each budget."""
    from opdlm_megatron.training.trainer import Trainer

    arm = arm_spec(name, args.decay_steps, args.tasks_per_rollout // args.batch)
    student_ckpt, offset = inits[arm.shift], 0
    if arm.warm_start is not None:
        student_ckpt, offset = warm_start(arm.warm_start, args, inits, teacher_ckpt, train, held, work), arm.warm_start[1]
    run_dir = os.path.join(work, "arms" if record else "scratch", safe(name))
    cfg = arm_config(name, arm, args, student_ckpt, teacher_ckpt, run_dir)
    progress_file = os.path.join(run_dir, "progress.json")
    with initialize_runtime(device="cpu", seed=3) as rt:
        trainer = Trainer(cfg, rt, samples=train)
        teacher = trainer.teacher or FrozenTeacher.from_checkpoint(teacher_ckpt, trainer.config)
        progress = {"train_s": 0.0, "wall_s": 0.0}
        if trainer.step and os.path.isfile(progress_file):
            progress = json.load(open(progress_file))
            log(f"{name}: resumed at step {trainer.step} (T={trainer.counters['paper_tokens_total']:.0f})")
        started = time.time() - progress["wall_s"]
        pending = sorted(budgets)
        tokens = trainer.counters["paper_tokens_total"]
        stale = [b for b in pending if b < tokens and not (trainer.step and b == 0)]
        if stale and trainer.step:
            log(f"{name}: budgets {stale} lie before the resumed step (T={tokens:.0f}); they are not evaluated")
            pending = [b for b in pending if b not in stale]
        metrics: Dict[str, float] = {}
        while pending:
            if tokens >= pending[0]:
                evaluation = evaluate_student(trainer.student, trainer.config, teacher, held, args.eval_batch)
                wall = time.time() - started
                if trainer.step:
                    progress = {"train_s": progress["train_s"], "wall_s": wall}
                    trainer.save()
                    json.dump(progress, open(progress_file, "w"))
                if record:
                    row = record_row(name, pending[0], trainer, evaluation, wall, progress["train_s"], offset,
                                     cfg.optim.lr)
                    on_row(row)
                    log(f"{name:22s} T={tokens:>9.0f} step {trainer.step:5d}: acc@0.9 {evaluation.acc_tau:.3f} "
                        f"TPF {evaluation.tpf_tau:.2f} acc@1/step {evaluation.acc_static:.3f} "
                        f"acc@block1 {evaluation.acc_block1:.3f} teacher NLL {evaluation.teacher_nll:.3f} "
                        f"NLL(teacher answers) AR {evaluation.nll_ar:.3f} block {evaluation.nll_block:.3f} "
                        f"loss {metrics.get('loss', float('nan')):.4f} ({wall:.0f} s)")
                if arm.warm_start is None:
                    keep_warm_start_model(name, pending[0], trainer, work)
                while pending and tokens >= pending[0]:
                    pending.pop(0)
                continue
            step_start = time.time()
            metrics = trainer.train_step()
            progress["train_s"] += time.time() - step_start
            tokens = trainer.counters["paper_tokens_total"]
        trainer.close()


def keep_warm_start_model(name: str, budget: int, trainer, work: str) -> None:
    """The student of arm ``name`` at ``budget`` as a model checkpoint (a warm start for other arms)."""
    directory = os.path.join(work, "students", f"{safe(name)}_T{budget}")
    if budget and not is_checkpoint(directory):
        save_model_checkpoint(trainer.student, directory, trainer.config)


def warm_start(source: Tuple[str, int], args, inits, teacher_ckpt, train, held, work: str) -> str:
    """Arm ``source[0]``'s student at ``source[1]`` tokens (trained again, off the record, if missing)."""
    name, budget = source
    directory = os.path.join(work, "students", f"{safe(name)}_T{budget}")
    if not is_checkpoint(directory):
        log(f"warm start: training {name} to T={budget} (its student at that budget is not under {work})")
        run_arm(name, args, inits, teacher_ckpt, train, held, [budget], work, on_row=None, record=False)
    return directory


def record_row(arm: str, budget: int, trainer, e: Evaluation, wall: float, train_s: float, offset: int,
               lr: float) -> dict:
    counters = trainer.counters

    def se(p: float) -> float:  # binomial standard error of a held-out accuracy
        return math.sqrt(p * (1 - p) / LIMITS.held_out)

    return dict(arm=arm, budget_tokens=budget + offset, paper_tokens=int(counters["paper_tokens_total"]) + offset,
                supervised_tokens=int(counters["tokens_trained"]), answer_tokens=int(counters["answer_tokens_total"]),
                steps=trainer.step, lr=lr, acc_tau09=e.acc_tau, se_tau09=se(e.acc_tau),
                tpf_tau09=e.tpf_tau, acc_static1=e.acc_static,
                se_static1=se(e.acc_static), tpf_static1=e.tpf_static,
                acc_block1=e.acc_block1, teacher_nll=e.teacher_nll, nll_ar_teacher_answers=e.nll_ar,
                nll_block_teacher_answers=e.nll_block, answer_len=e.answer_tokens, wall_s=round(wall, 1),
                s_per_step=round(train_s / max(trainer.step, 1), 3))



# ---------------------------------------------------------------------------------- summary
def read_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            if key != "arm":
                r[key] = float(value)
    return rows


class RowWriter:
    """Appends rows to the CSV as they land (header first when the file is new)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, row: dict) -> None:
        new = not os.path.isfile(self.path) or os.path.getsize(self.path) == 0
        if not new:
            with open(self.path) as f:
                header = f.readline().strip().split(",")
            if header != list(row):
                raise SystemExit(f"data_efficiency.py: error: {self.path} has other columns ({header}); move it away")
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def tokens_to_reach(rows: List[dict], arm: str, accuracy: float, unit: str = "paper_tokens") -> Optional[float]:
    hits = [r[unit] for r in rows if r["arm"] == arm and r["budget_tokens"] > 0 and r["acc_tau09"] >= accuracy - 1e-12]
    return min(hits) if hits else None


def teacher_accuracy_of(rows: List[dict]) -> Optional[float]:
    """The teacher's held-out greedy accuracy as the CSV records it: an untrained student with the logit
    shift (a budget-0 row) decoded with blocks of one token is the teacher decoding causally, so its
    ``acc_block1`` is the teacher's accuracy (the rows of one CSV come from one teacher)."""
    for r in rows:
        base = r["arm"].partition("@")[0]
        if r["budget_tokens"] == 0 and r["steps"] == 0 and base in ARMS and ARMS[base].shift:
            return r["acc_block1"]
    return None


def best_point(rows: List[dict], arm: str) -> Optional[dict]:
    points = [r for r in rows if r["arm"] == arm and r["budget_tokens"] > 0]
    return max(points, key=lambda r: (r["acc_tau09"], -r["paper_tokens"])) if points else None


def final_point(rows: List[dict], arm: str) -> Optional[dict]:
    points = [r for r in rows if r["arm"] == arm and r["budget_tokens"] > 0]
    return max(points, key=lambda r: r["paper_tokens"]) if points else None


def summarize(rows: List[dict], teacher_acc: float) -> Tuple[dict, str]:
    candidates = [a for a in OPD_ARMS if best_point(rows, a)]
    best_arm = max(candidates, key=lambda a: (best_point(rows, a)["acc_tau09"], -best_point(rows, a)["paper_tokens"]),
                   default=None)
    best = best_point(rows, best_arm) if best_arm else None
    summary = dict(teacher_acc=teacher_acc, best_opd_arm=best_arm)
    nan = float("nan")
    ratio, ratio_answers = nan, nan
    if best is not None:
        for unit, key in (("paper_tokens", "ratio"), ("answer_tokens", "ratio_answers")):
            reached = tokens_to_reach(rows, "mdlm", best["acc_tau09"], unit)
            own = tokens_to_reach(rows, best_arm, best["acc_tau09"], unit)
            value = nan if not any(r["arm"] == "mdlm" for r in rows) else (
                float("inf") if reached is None else reached / max(own, 1))
            summary[f"mdlm_tokens_over_opd_{unit}"] = value
        ratio, ratio_answers = summary["mdlm_tokens_over_opd_paper_tokens"], summary["mdlm_tokens_over_opd_answer_tokens"]

    def drop(arm):
        point = final_point(rows, arm) if arm else None
        return nan if point is None else point["acc_static1"] - point["acc_tau09"]

    summary.update(opd_static_drop=drop(best_arm), sft_static_drop=drop("sft"),
                   drops={a: drop(a) for a in dict.fromkeys(r["arm"] for r in rows)})
    line = (f"teacher_acc={teacher_acc:.3f} opd_acc={best['acc_tau09'] if best else nan:.3f} "
            f"opd_tpf={best['tpf_tau09'] if best else nan:.2f} opd_static_drop={summary['opd_static_drop']:.3f} "
            f"sft_static_drop={summary['sft_static_drop']:.3f} mdlm_tokens_over_opd={ratio:.1f}")
    summary["mdlm_tokens_over_opd_answer_tokens"] = ratio_answers
    return summary, line


def markdown_table(rows: List[dict]) -> str:
    """Every row of the CSV as a Markdown table (what BENCHMARKS.md quotes)."""
    head = ("| arm | budget T | paper T | answer T | steps | acc τ=0.9 (±SE) | TPF τ=0.9 | acc 1/step | as AR | "
            "NLL AR / block | wall s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['budget_tokens']:,.0f} | {r['paper_tokens']:,.0f} | {r['answer_tokens']:,.0f} | "
                     f"{r['steps']:.0f} | {r['acc_tau09']:.3f} ±{r['se_tau09']:.3f} | {r['tpf_tau09']:.2f} | "
                     f"{r['acc_static1']:.3f} | {r['acc_block1']:.3f} | {r['nll_ar_teacher_answers']:.3f} / "
                     f"{r['nll_block_teacher_answers']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], teacher_acc: float, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, unit, label in ((axes[0], "paper_tokens", "paper training tokens T (samples x generation length)"),
                            (axes[1], "answer_tokens", "answer tokens trained on")):
        for arm in arms:
            pts = sorted((r[unit], r["acc_tau09"], r["se_tau09"]) for r in rows if r["arm"] == arm and r[unit] > 0)
            if pts:
                x, y, se = zip(*pts)
                ax.errorbar(x, y, yerr=se, marker="o", markersize=3, capsize=2, label=arm)
        ax.axhline(teacher_acc, color="gray", linestyle="--", label="teacher (AR)")
        ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel("accuracy at threshold 0.9 (+- SE)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_efficiency_tokens.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in arms:
        pts = [(r["tpf_tau09"], r["acc_tau09"]) for r in rows if r["arm"] == arm and r["budget_tokens"] > 0]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", markersize=3, linestyle=":", label=arm)
    ax.axhline(teacher_acc, color="gray", linestyle="--", label="teacher (AR, TPF 1)")
    ax.set_xlabel("tokens per forward (threshold 0.9)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_efficiency_tpf.png"), dpi=110)
    plt.close(fig)

    finals = [(arm, final_point(rows, arm)) for arm in arms]
    finals = [(a, p) for a, p in finals if p is not None]
    fig, ax = plt.subplots(figsize=(max(6, len(finals) * 0.9), 4.5))
    width = 0.38
    for i, (arm, p) in enumerate(finals):
        ax.bar(i - width / 2, p["acc_static1"], width, yerr=p["se_static1"], color="tab:blue",
               label="one token per step" if i == 0 else None)
        ax.bar(i + width / 2, p["acc_tau09"], width, yerr=p["se_tau09"], color="tab:orange",
               label="threshold 0.9 (dynamic)" if i == 0 else None)
    ax.axhline(teacher_acc, color="gray", linestyle="--", label="teacher (AR)")
    ax.set_xticks(range(len(finals)), [f"{a}\nT={p['paper_tokens'] / 1e6:.1f}M" for a, p in finals], fontsize=7)
    ax.set_ylabel("accuracy at the final budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_efficiency_static.png"), dpi=110)
    plt.close(fig)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything: checks that every artefact is produced")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--work", default=None, help="teacher, students and the arms' checkpoints (default: "
                   "$OPDLM_CACHE/study2, ~/.cache/opdlm/study2; --quick: a new temporary folder)")
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--budgets", default="0,32768,131072,262144,524288,1048576,2621440")
    p.add_argument("--opd-budgets", default="4194304", help="extra budgets of the OPD arms (opd_*)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--teacher-eval-every", type=int, default=250)
    p.add_argument("--teacher-target", type=float, default=0.95)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks-per-rollout", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--decay-steps", type=int, default=2000, help="cosine to 0.1 x lr over this many steps")
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--max-answer", type=int, default=64, help="generation length of rollouts and evaluations")
    p.add_argument("--eval-batch", type=int, default=200)
    p.add_argument("--summary-only", action="store_true",
                   help="plots and the last line from the CSV, no teacher, no training (the teacher's accuracy "
                        "is read off the CSV's untrained students)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.teacher_steps, args.teacher_eval_every = 2, 64, 20, 20
        args.budgets, args.opd_budgets, args.held_out, args.tasks_per_rollout = "0,1024", "2048", 8, 32
        args.max_answer = 16
        args.decay_steps, args.warmup_steps = 40, 2
        if args.arms == DEFAULT_ARMS:
            args.arms = DEFAULT_ARMS + ",opd_all_rounds@schedule,opd_block@from=kd_off:1024"
    if args.work is None:
        args.work = tempfile.mkdtemp(prefix="study_quick_") if args.quick else os.path.join(
            os.environ.get("OPDLM_CACHE", os.path.expanduser("~/.cache/opdlm")), "study2")
    return args


def main() -> None:
    args = parse_args()
    LIMITS.held_out, LIMITS.max_answer = args.held_out, args.max_answer
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    csv_path = os.path.join(args.out, CSV_NAME)
    rng = random.Random(0)
    train = [problem(rng)[0] for _ in range(20000 if not args.quick else 2000)]
    held = [problem(random.Random(10**6 + i)) for i in range(args.held_out)]
    started = time.time()
    arms = [a for a in args.arms.split(",") if a]
    for name in arms:
        arm_spec(name, args.decay_steps, 1)  # refuse a bad arm before hours of work

    if args.summary_only:
        # the rows may come from a teacher that is not under --work (another machine's): never train one here
        teacher_acc = teacher_accuracy_of(read_rows(csv_path))
        if teacher_acc is None:
            raise SystemExit(f"data_efficiency.py: error: --summary-only needs an arm's untrained student (budget 0) "
                             f"in {csv_path}, whose causal decoding gives the teacher's accuracy")
    else:
        teacher_ckpt, teacher_acc = train_teacher(args, train, held, args.work)
        log(f"teacher: {teacher_ckpt} held-out greedy accuracy {teacher_acc:.3f}")
        inits = {shift: student_init(teacher_ckpt, os.path.join(args.work, f"student_shift{int(shift)}"), shift)
                 for shift in (True, False)}
        writer = RowWriter(csv_path)
        for name in arms:
            base = name.partition("@")[0]
            budgets = [int(b) for b in args.budgets.split(",")]
            if base.startswith("opd_") and base in OPD_ARMS:
                budgets += [int(b) for b in args.opd_budgets.split(",") if b]
            done = {int(r["budget_tokens"]) for r in read_rows(csv_path) if r["arm"] == name}
            offset = arm_spec(name, args.decay_steps, 1).warm_start
            pending = [b for b in budgets if b + (offset[1] if offset else 0) not in done]
            if not pending:
                log(f"{name}: every budget is in {csv_path}")
                continue
            run_arm(name, args, inits, teacher_ckpt, train, held, pending, args.work, writer)

    rows = read_rows(csv_path)
    plot(rows, teacher_acc, args.out)
    with open(os.path.join(args.out, "data_efficiency.md"), "w") as f:
        f.write(markdown_table(rows))
    summary, line = summarize(rows, teacher_acc)
    with open(os.path.join(args.out, "data_efficiency.json"), "w") as f:
        json.dump(dict(summary, rows=rows, seconds=time.time() - started, args=vars(args)), f, indent=1)
    log(f"best OPD arm: {summary['best_opd_arm']}; mdlm tokens over OPD's in answer tokens "
        f"{summary.get('mdlm_tokens_over_opd_answer_tokens', float('nan')):.2f}; total {time.time() - started:.0f} s; "
        f"results in {args.out}")
    print(line)


if __name__ == "__main__":
    main()
