"""Quantized block-diffusion students (NVIDIA ModelOpt fake quantization) against the unquantized student.

    python benchmarks/quantization.py [--student DIR] [--qat-steps 32] [--quick]

The student is the data-efficiency study's best OPD student (``benchmarks/data_efficiency.py``: the
arithmetic task, its own AR teacher; default ``<work>/students/opd_all_rounds_T4194304``). Five variants,
each decoded greedily on the study's held-out problems at threshold 0.9:

* ``unquantized``: the student as trained (float32 here; "BF16" in the issue's words: its training precision);
* ``fp8 PTQ`` / ``int8_sq PTQ``: ``opdlm-quantize``'s path (``rollout/calibration.py``), calibrated on the
  student decoding ``--calibration-prompts`` training prompts at threshold 0.9;
* ``fp8 QAT``: quantization-aware OPD (``quantization.format: fp8``) for ``--qat-steps`` optimizer steps from
  the student, with the study's OPD arm settings (all rounds, 128 tasks per rollout, batch 32) at the study's
  final learning rate (0.1 x 3e-4, constant): calibrated on its own decoding, then trained fake-quantized
  against the unquantized teacher;
* ``unquantized, continued``: the same steps without quantization - the control that separates what
  quantization costs from what the extra steps give.

Per variant: accuracy +- its standard error, tokens per forward (TPF), agreement with the teacher's greedy
answers (the same final answer) and the teacher's NLL of the variant's answers (per token). Last line:
``format=fp8 ptq_acc_ratio=A qat_acc_ratio=B ptq_tpf_ratio=C qat_tpf_ratio=D`` (ratios to the unquantized
student). ``--quick`` trains a tiny teacher, starts the student from its weights and takes 2 QAT steps: it
checks that every number is produced. Speed is not measured here (fake quantization rounds in the model's
dtype; FP8 GEMMs need a GPU: ``scripts/gpu_checks.sh``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data_efficiency as study  # noqa: E402

from opdlm_megatron.checkpoint.model import build_from_checkpoint, is_checkpoint, save_model_checkpoint  # noqa: E402
from opdlm_megatron.distill.answers import results_from_answers  # noqa: E402
from opdlm_megatron.distill.teacher import FrozenTeacher  # noqa: E402
from opdlm_megatron.eval.runner import ar_config, generate, student_decode, teacher_decode  # noqa: E402
from opdlm_megatron.rollout.calibration import quantize_on_rollouts  # noqa: E402
from opdlm_megatron.rollout.config import DecodeConfig  # noqa: E402
from opdlm_megatron.runtime.platform import initialize_runtime  # noqa: E402

STUDY_LR = 3e-4  # data_efficiency.py's --lr; its cosine ends at 0.1 x


def evaluate(model, config, teacher: FrozenTeacher, held, teacher_final, batch: int) -> dict:
    """Greedy decoding of the held-out prompts at threshold 0.9: accuracy (+- SE), TPF, agreement with the
    teacher's final answers, the teacher's NLL per answer token."""
    prompts = [s.prompt_ids for s, _ in held]
    base = DecodeConfig(max_new_tokens=study.LIMITS.max_answer, eos_token_ids=[study.EOS], temperature=0.0)
    gens = generate(model, config, prompts, student_decode(base, None, config.block_size), batch)
    answers = results_from_answers(prompts, [g.ids for g in gens], [g.finished for g in gens], study.PAD)
    nll = teacher.answer_nll(answers.prompt_ids, answers.prompt_valid, answers.answer_ids, answers.answer_valid, batch)
    tokens = sum(len(g.ids) for g in gens)
    accuracy = study.accuracy_of(gens, held)
    return dict(accuracy=accuracy, se=math.sqrt(accuracy * (1 - accuracy) / len(held)),
                tpf=tokens / max(1, sum(g.forwards for g in gens)),
                agreement=sum(study.final_answer(g.ids) == t for g, t in zip(gens, teacher_final)) / len(held),
                teacher_nll=float(nll.sum()) / max(1, tokens))


def continued(student_ckpt: str, teacher_ckpt: str, train, args, fmt):
    """The student after ``args.qat_steps`` OPD steps (all rounds), quantization-aware to ``fmt`` (None: not)."""
    from opdlm_megatron.training.trainer import Trainer

    lr = 0.1 * STUDY_LR
    settings = SimpleNamespace(lr=lr, batch=args.batch, tasks_per_rollout=args.tasks_per_rollout, warmup_steps=0,
                               decay_steps=10**7)
    arm = study.Arm("opd", overrides={**study.ARMS["opd_all_rounds"].overrides, "optim.min_lr": lr,
                                      **({"quantization.format": fmt,
                                          "quantization.calibration_prompts": args.calibration_prompts} if fmt else {})})
    run_dir = tempfile.mkdtemp(prefix=f"quant_{fmt or 'none'}_")
    cfg = study.arm_config("opd_all_rounds", arm, settings, student_ckpt, teacher_ckpt, run_dir)
    with initialize_runtime(device="cpu", seed=3) as rt:
        trainer = Trainer(cfg, rt, samples=train)
        start = time.time()
        for _ in range(args.qat_steps):
            metrics = trainer.train_step()
        study.log(f"{fmt or 'unquantized'} OPD: {args.qat_steps} steps, last loss {metrics['loss']:.4f} "
                  f"({time.time() - start:.0f} s)")
        path = os.path.join(run_dir, "student")
        save_model_checkpoint(trainer.student, path, trainer.config)
        trainer.close()
    return path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="the study's folder (default: $OPDLM_CACHE/study2, ~/.cache/opdlm/study2)")
    p.add_argument("--student", default=None, help="default: <work>/students/opd_all_rounds_T4194304")
    p.add_argument("--teacher", default=None, help="default: <work>/teacher_L4H128S3000Q0")
    p.add_argument("--format", default="fp8", choices=("fp8", "int8_sq"), help="the format of the QAT run")
    p.add_argument("--qat-steps", type=int, default=32)
    p.add_argument("--calibration-prompts", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks-per-rollout", type=int, default=128)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--max-answer", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.qat_steps, args.calibration_prompts, args.held_out, args.max_answer = 2, 8, 8, 16
        args.tasks_per_rollout, args.batch = 8, 4
    return args


def main() -> None:
    args = parse_args()
    study.LIMITS.held_out, study.LIMITS.max_answer = args.held_out, args.max_answer
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(0)
    train = [study.problem(rng)[0] for _ in range(20000 if not args.quick else 2000)]
    held = [study.problem(random.Random(10**6 + i)) for i in range(args.held_out)]
    if args.quick:  # a tiny teacher; the student starts from its weights
        work = tempfile.mkdtemp(prefix="quant_quick_")
        teacher_args = SimpleNamespace(layers=2, hidden=64, teacher_steps=20, teacher_eval_every=20, quick=True,
                                       teacher_target=0.95, eval_batch=args.eval_batch)
        teacher_ckpt, _ = study.train_teacher(teacher_args, train, held, work)
        student_ckpt = study.student_init(teacher_ckpt, os.path.join(work, "student"), True)
    else:
        work = args.work or os.path.join(os.environ.get("OPDLM_CACHE", os.path.expanduser("~/.cache/opdlm")), "study2")
        teacher_ckpt = args.teacher or os.path.join(work, "teacher_L4H128S3000Q0")
        student_ckpt = args.student or os.path.join(work, "students", "opd_all_rounds_T4194304")
    for name, path in (("--teacher", teacher_ckpt), ("--student", student_ckpt)):
        if not is_checkpoint(path):
            raise SystemExit(f"quantization.py: error: {name} {path} is not a checkpoint; run "
                             f"benchmarks/data_efficiency.py first (or pass --quick)")
    started = time.time()
    calibration = [s.prompt_ids for s in train[:args.calibration_prompts]]
    decode = DecodeConfig(max_new_tokens=args.max_answer, threshold=0.9, temperature=0.0, eos_token_ids=[study.EOS])
    variants = {"unquantized": (student_ckpt, None), "fp8 PTQ": (student_ckpt, "fp8"),
                "int8_sq PTQ": (student_ckpt, "int8_sq"),
                f"{args.format} QAT": (continued(student_ckpt, teacher_ckpt, train, args, args.format), None),
                "unquantized, continued": (continued(student_ckpt, teacher_ckpt, train, args, None), None)}
    results = {}
    with initialize_runtime(device="cpu", seed=0):
        teacher_model, teacher_config = build_from_checkpoint(teacher_ckpt, "teacher")
        teacher_gens = generate(teacher_model, ar_config(teacher_config), [s.prompt_ids for s, _ in held],
                                teacher_decode(DecodeConfig(max_new_tokens=args.max_answer, eos_token_ids=[study.EOS])),
                                args.eval_batch)
        teacher_final = [study.final_answer(g.ids) for g in teacher_gens]
        teacher_acc = study.accuracy_of(teacher_gens, held)
        for name, (path, ptq) in variants.items():
            model, config = build_from_checkpoint(path, "student")
            model.eval()
            teacher = FrozenTeacher(teacher_model, teacher_config, config)
            if ptq is not None:
                quantize_on_rollouts(model, config, ptq, calibration, decode, batch_size=args.eval_batch)
            results[name] = evaluate(model, config, teacher, held, teacher_final, args.eval_batch)
            r = results[name]
            study.log(f"{name:24s} acc {r['accuracy']:.3f} +- {r['se']:.3f}  TPF {r['tpf']:.2f}  agreement "
                      f"{r['agreement']:.3f}  teacher NLL {r['teacher_nll']:.4f}")
    base = results["unquantized"]
    ptq, qat = results[f"{args.format} PTQ"], results[f"{args.format} QAT"]

    def ratio(a, b):
        return a / b if b else float("nan")

    line = (f"format={args.format} ptq_acc_ratio={ratio(ptq['accuracy'], base['accuracy']):.3f} "
            f"qat_acc_ratio={ratio(qat['accuracy'], base['accuracy']):.3f} "
            f"ptq_tpf_ratio={ratio(ptq['tpf'], base['tpf']):.3f} qat_tpf_ratio={ratio(qat['tpf'], base['tpf']):.3f}")
    with open(os.path.join(args.out, "quantization.json" if not args.quick else "quantization_quick.json"), "w") as f:
        json.dump(dict(results=results, teacher_acc=teacher_acc, student=student_ckpt, teacher=teacher_ckpt,
                       seconds=time.time() - started, args=vars(args), line=line), f, indent=1)
    study.log(f"teacher acc {teacher_acc:.3f}; {time.time() - started:.0f} s")
    print(line)


if __name__ == "__main__":
    main()
