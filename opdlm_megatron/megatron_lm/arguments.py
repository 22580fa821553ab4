"""OPD's Megatron-LM command-line flags (``add_opd_args``) and their translation into ``TrainConfig``.

Megatron-LM's own flags keep what they mean: the parallel layout, batch sizes (``--global-batch-size``
is the paper's effective batch, ``--micro-batch-size``), ``--train-iters``, the optimizer and its
schedule, ``--seed``, checkpointing (``--save``/``--load``/``--pretrained-checkpoint``) and logging.
The OPD group adds what Megatron-LM has no flag for; every flag maps to one ``TrainConfig`` key (the
same keys as the project's YAML configs), ``--opd-config`` reads such a YAML for the rest and
``--opd-set key=value`` overrides any key.

The architecture comes from the student's ``opdlm_model_config.json`` (``--opd-student``): the entry
script fills Megatron-LM's model flags from it (``model_flag_defaults``) and ``check_model_flags``
rejects flags that contradict it, so the model Megatron-LM trains is the one ``model.build_model``
builds for the project's own trainer.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Dict, List, Optional

import yaml

from ..train_config import DIVERGENCES, TrainConfig, apply_overrides, train_config_from_dict

if TYPE_CHECKING:  # the model config (torch) loads when a run starts, not for --help
    from ..config import ModelConfig

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
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    g.add_argument("--opd-teacher-precision", choices=sorted(PRECISIONS), default=None,
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


def _flag_overrides(args) -> List[str]:
    out = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "opd_teacher_precision":
            value = PRECISIONS[value]
        out.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def train_config_from_args(args) -> TrainConfig:
    """The ``TrainConfig`` of a Megatron-LM run: ``--opd-config`` (if any) < Megatron-LM's batch,
    step and seed flags < the OPD flags < ``--opd-set``. Raises ValueError naming a bad value."""
    data: Dict = {}
    if args.opd_config:
        if not os.path.isfile(args.opd_config):
            raise ValueError(f"--opd-config {args.opd_config}: no such file")
        with open(args.opd_config) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--opd-config {args.opd_config} must hold a mapping")
        # Megatron-LM owns these; a value in the YAML would silently disagree with the flags
        for owned in ("train", "optim", "parallel", "checkpoint"):
            data.pop(owned, None)
    megatron = [f"train.global_batch_size={args.global_batch_size}", f"train.micro_batch_size={args.micro_batch_size}",
                f"seed={args.seed}", "checkpoint.resume=false", "logging.progress_bar=false"]
    if "run_dir" not in data:  # --opd-run-dir (a flag, applied below) > the YAML's > --save > a default
        megatron.append(f"run_dir={args.save or 'runs/opdlm-megatron-lm'}")
    if args.train_iters:
        megatron.append(f"train.steps={args.train_iters}")
    data = apply_overrides(data, megatron)
    return train_config_from_dict(data, _flag_overrides(args) + list(args.opd_set))


def student_config_from_args(args, cfg: TrainConfig) -> ModelConfig:
    """The student's ModelConfig with the run's block size / attention kernel / [MASK] / logit-shift
    overrides (the dtype comes from Megatron-LM's --bf16 / --fp16)."""
    from ..checkpointing import load_model_config

    config = load_model_config(cfg.model.student_checkpoint)
    if cfg.block_size is not None:
        config = config.replace(block_size=cfg.block_size)
    if cfg.model.attention_backend:
        config = config.replace(attention_backend=cfg.model.attention_backend)
    if args.opd_mask_token_id is not None:
        if not 0 <= args.opd_mask_token_id < config.vocab_size:
            raise ValueError(f"--opd-mask-token-id {args.opd_mask_token_id} is outside the vocabulary [0, {config.vocab_size})")
        config = config.replace(mask_token_id=args.opd_mask_token_id)
    if args.opd_logit_shift is not None:
        config = config.replace(logit_shift=args.opd_logit_shift == "on")
    return config


def model_flag_defaults(config: ModelConfig) -> Dict:
    """Megatron-LM model flags (``args_defaults``) that describe ``config``'s architecture."""
    return dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.query_groups,
        kv_channels=config.head_dim, max_position_embeddings=config.max_sequence_length,
        seq_length=config.max_sequence_length, tokenizer_type="NullTokenizer", vocab_size=config.vocab_size,
    )


def check_model_flags(args, config: ModelConfig, source: str = "") -> None:
    """Megatron-LM flags must not contradict the student's architecture (one line per mismatch)."""
    expected = {k: v for k, v in model_flag_defaults(config).items()
                if k not in ("seq_length", "tokenizer_type", "vocab_size")}
    if config.query_groups != config.num_attention_heads and not args.group_query_attention:
        expected["group_query_attention"] = True
    wrong = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (student: {v!r})" for k, v in expected.items()
             if getattr(args, k, None) is not None and getattr(args, k) != v]
    if args.calculate_per_token_loss:
        wrong.append("--calculate-per-token-loss (OPD normalises its loss itself; leave it off)")
    if args.virtual_pipeline_model_parallel_size not in (None, 1):
        wrong.append("--num-layers-per-virtual-pipeline-stage (virtual pipelines are not supported by OPD yet)")
    if args.context_parallel_size != 1:
        wrong.append(f"--context-parallel-size {args.context_parallel_size} (OPD's attention layouts need 1)")
    if args.sequence_parallel:
        wrong.append("--sequence-parallel (not supported by the OPD output-column selection)")
    if wrong:
        raise ValueError(f"Megatron-LM flags contradict the student config{' in ' + source if source else ''}: "
                         + "; ".join(wrong))


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
