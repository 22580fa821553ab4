"""OPD's Megatron-LM command-line flags: the argument group (``add_opd_args``, Megatron-LM's
``extra_args_provider``), which ``TrainConfig`` key each flag sets (``FLAG_KEYS``; ``arguments.py``
translates them), and what the entry point reads before Megatron-LM parses (``pre_parse``). Imports
nothing heavy, so ``opdlm-pretrain-megatron-lm --help`` answers at once."""

from __future__ import annotations

import argparse
from typing import List, Optional

from ...config.choices import DIVERGENCES, DTYPE_ALIASES

# flag (dest) -> TrainConfig key; None values are "not given" and leave the key alone
FLAG_KEYS = {
    "opd_objective": "objective",
    "opd_student": "model.student_checkpoint",
    "opd_teacher": "model.teacher_checkpoint",
    "opd_teacher_precision": "model.teacher_dtype",
    "opd_tokenizer": "model.tokenizer",
    "opd_block_size": "block_size",
    "opd_divergence": "loss.divergence",
    "opd_top_k": "loss.top_k",
    "opd_tasks_per_rollout": "rollout.tasks_per_rollout",
    "opd_threshold": "rollout.threshold",
    "opd_rollout_temperature": "rollout.temperature",
    "opd_tokens_per_step": "rollout.tokens_per_step",
    "opd_min_length": "curriculum.min_length",
    "opd_max_length": "curriculum.max_length",
    "opd_warmup_rollouts": "curriculum.warmup_rollouts",
    "opd_data_source": "data.source",
    "opd_data_path": "data.path",
    "opd_gym_datasets": "data.gym_datasets",
    "opd_run_dir": "run_dir",
}


def add_opd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the OPD argument group."""
    g = parser.add_argument_group("OPD (opdlm-megatron)", "on-policy self-distillation of an ARLM into a block-diffusion LM")
    g.add_argument("--opd-student", required=True,
                   help="the student's opdlm-megatron checkpoint (or a Megatron-LM checkpoint written by "
                        "opdlm-convert-checkpoint): its opdlm_model_config.json defines the architecture, "
                        "[MASK] id and block size, its tokenizer/ the prompts' tokenizer")
    g.add_argument("--opd-teacher", default=None,
                   help="teacher checkpoint (opdlm-megatron or Megatron-LM layout); default: the student's "
                        "weights before training (self-distillation; --pretrained-checkpoint when resuming)")
    g.add_argument("--opd-teacher-precision", choices=sorted(DTYPE_ALIASES), default=None,
                   help="teacher parameter dtype (default: the teacher checkpoint's)")
    g.add_argument("--opd-objective", default=None,
                   help="default: opd; or a baseline / ablation (opd_off, kd_off, sft, mdlm, opd_tcs, tcs, lift, lift2, "
                        "ar): the run's objective key, checked with the config")
    g.add_argument("--opd-block-size", type=int, default=None, help="default: the student config's")
    g.add_argument("--opd-mask-token-id", type=int, default=None,
                   help="override the student config's [MASK] id (it must exist in the vocabulary)")
    g.add_argument("--opd-logit-shift", choices=("on", "off"), default=None,
                   help="override the student config's logit shift (paper: off)")
    g.add_argument("--opd-divergence", choices=DIVERGENCES, default=None, help="default: forward_kl")
    g.add_argument("--opd-top-k", type=int, default=None, help="teacher top-k targets (default: full vocabulary)")
    g.add_argument("--opd-tasks-per-rollout", type=int, default=None,
                   help="prompts per rollout (paper 128); each rollout feeds tasks/global-batch steps")
    g.add_argument("--opd-threshold", type=float, default=None, help="rollout commit confidence (paper 0.9)")
    g.add_argument("--opd-rollout-temperature", type=float, default=None, help="rollout sampling temperature")
    g.add_argument("--opd-tokens-per-step", type=int, default=None, help="static commits per step instead")
    g.add_argument("--opd-min-length", type=int, default=None, help="curriculum: first rollout length")
    g.add_argument("--opd-max-length", type=int, default=None, help="curriculum: final rollout length")
    g.add_argument("--opd-warmup-rollouts", type=int, default=None, help="curriculum: rollouts to the final length")
    g.add_argument("--opd-data-source", default=None, help="jsonl_chat | reasoning_gym | text | token_ids")
    g.add_argument("--opd-data-path", default=None, help="prompt file for jsonl_chat / text / token_ids")
    g.add_argument("--opd-gym-datasets", nargs="+", default=None, help="reasoning-gym datasets")
    g.add_argument("--opd-tokenizer", default=None, help="HF tokenizer dir (default: <student>/tokenizer)")
    g.add_argument("--opd-run-dir", default=None,
                   help="OPD side files (metrics.jsonl, teacher answers cache); default: --opd-config's run_dir, "
                        "else --save, else runs/opdlm-megatron-lm")
    g.add_argument("--opd-config", default=None, help="a YAML in the project's training-config format for the rest")
    g.add_argument("--opd-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any training-config key (repeatable), e.g. --opd-set loss.top_k=64")
    return parser


def pre_parse(argv: List[str]) -> argparse.Namespace:
    """``--opd-student``, ``--opd-teacher``, ``--pretrained-checkpoint`` and ``--save`` from the raw
    command line (before Megatron-LM parses it)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--opd-student", "--opd-teacher", "--pretrained-checkpoint", "--save"):
        parser.add_argument(flag, default=None)
    known, _ = parser.parse_known_args(argv)
    return known


def pre_parse_student(argv: List[str]) -> Optional[str]:
    """``--opd-student`` from the raw command line (before Megatron-LM parses it)."""
    return pre_parse(argv).opd_student
