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

import os
from typing import TYPE_CHECKING, Dict, List

import yaml

from ...config.choices import DTYPE_ALIASES
from ...training.config import TrainConfig
from ...training.config_files import apply_overrides, train_config_from_dict
from .flags import FLAG_KEYS

if TYPE_CHECKING:  # the model config (torch) loads when a run starts, not for --help
    from ...config.model import ModelConfig



def _flag_overrides(args) -> List[str]:
    out = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "opd_teacher_precision":
            value = DTYPE_ALIASES[value]
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
        for owned in ("train", "optim", "parallel", "checkpoint", "moe"):
            data.pop(owned, None)
    megatron = [f"train.global_batch_size={args.global_batch_size}", f"train.micro_batch_size={args.micro_batch_size}",
                f"seed={args.seed}", "checkpoint.resume=false", "logging.progress_bar=false",
                f"parallel.tensor_model_parallel_size={args.tensor_model_parallel_size}",
                f"parallel.pipeline_model_parallel_size={args.pipeline_model_parallel_size}",
                f"parallel.context_parallel_size={args.context_parallel_size}",
                f"parallel.expert_model_parallel_size={args.expert_model_parallel_size}",
                # Megatron-LM has turned it off at TP=1 already (with a warning)
                f"parallel.sequence_parallel={'true' if args.sequence_parallel else 'false'}"]
    if args.num_experts is not None:  # the router's training terms: --moe-router-load-balancing-type etc.
        megatron += [f"moe.{key}={value}" for key, value in _router_terms(args).items()]
    if "run_dir" not in data:  # --opd-run-dir (a flag, applied below) > the YAML's > --save > a default
        megatron.append(f"run_dir={args.save or 'runs/opdlm-megatron-lm'}")
    if args.train_iters:
        megatron.append(f"train.steps={args.train_iters}")
    data = apply_overrides(data, megatron)
    return train_config_from_dict(data, _flag_overrides(args) + list(args.opd_set))


def _router_terms(args) -> Dict[str, object]:
    """The ``moe`` section from Megatron-LM's router flags (one load-balancing type, one coefficient)."""
    def single(flag: str, value):
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError(f"--{flag} {' '.join(map(str, value))}: OPD takes one value")
            value = value[0]
        return value

    balancing = single("moe-router-load-balancing-type", args.moe_router_load_balancing_type)
    coeff = single("moe-aux-loss-coeff", args.moe_aux_loss_coeff)
    if balancing in ("sinkhorn", "quantile_balancing"):
        raise ValueError(f"--moe-router-load-balancing-type {balancing}: OPD's routers take none, aux_loss, "
                         f"seq_aux_loss or global_aux_loss")
    return dict(load_balancing=balancing, aux_loss_coeff=float(coeff), z_loss_coeff=float(args.moe_z_loss_coeff or 0.0))


def student_config_from_args(args, cfg: TrainConfig) -> ModelConfig:
    """The student's ModelConfig as the project's trainer derives it (``training.build.student_architecture``:
    block size, attention kernel) with the [MASK] / logit-shift flags of this path (the dtype comes from
    Megatron-LM's --bf16 / --fp16)."""
    import torch

    from ...checkpoint.model import load_model_config
    from ...training.build import student_architecture

    config = student_architecture(cfg, load_model_config(cfg.model.student_checkpoint),
                                  "cuda" if torch.cuda.is_available() else "cpu")
    if args.opd_mask_token_id is not None:
        if not 0 <= args.opd_mask_token_id < config.vocab_size:
            raise ValueError(f"--opd-mask-token-id {args.opd_mask_token_id} is outside the vocabulary [0, {config.vocab_size})")
        config = config.replace(mask_token_id=args.opd_mask_token_id)
    if args.opd_logit_shift is not None:
        config = config.replace(logit_shift=args.opd_logit_shift == "on")
    return config


def model_flag_defaults(config: ModelConfig) -> Dict:
    """Megatron-LM model flags (``args_defaults``: flags whose default is None) that describe ``config``'s
    architecture."""
    return dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.query_groups,
        kv_channels=config.head_dim, max_position_embeddings=config.max_sequence_length,
        seq_length=config.max_sequence_length, tokenizer_type="NullTokenizer", vocab_size=config.vocab_size,
        num_experts=config.num_experts,
        moe_ffn_hidden_size=config.expert_ffn_hidden_size if config.num_experts is not None else None,
    )


def moe_flags(config: ModelConfig, argv: List[str]) -> List[str]:
    """The flags a mixture-of-experts student adds to Megatron-LM's command line where it does not name them:
    those with a non-None default (``args_defaults`` cannot set them): top-k, the router's softmax, no
    load-balancing loss (the ``moe`` section's default: the routers train through the KL alone; the flags
    set it in this path), all-to-all dispatch (Megatron-LM's checks tie variable sequence lengths to it,
    and expert parallelism needs it)."""
    if config.num_experts is None:
        return []
    wanted = [("--moe-router-topk", [str(config.moe_router_topk)]),
              ("--moe-router-load-balancing-type", ["none"]),
              ("--moe-token-dispatcher-type", ["alltoall"])]
    if config.moe_router_pre_softmax:
        wanted.append(("--moe-router-pre-softmax", []))
    out: List[str] = []
    for flag, values in wanted:
        if flag not in argv:
            out += [flag, *values]
    return out


def check_model_flags(args, config: ModelConfig, source: str = "") -> None:
    """Megatron-LM flags must not contradict the student's architecture (one line per mismatch)."""
    expected = {k: v for k, v in model_flag_defaults(config).items()
                if k not in ("seq_length", "tokenizer_type", "vocab_size")}
    if config.num_experts is not None:
        expected.update(moe_router_topk=config.moe_router_topk, moe_router_pre_softmax=config.moe_router_pre_softmax)
    if config.query_groups != config.num_attention_heads and not args.group_query_attention:
        expected["group_query_attention"] = True
    wrong = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (student: {v!r})" for k, v in expected.items()
             if getattr(args, k, None) is not None and getattr(args, k) != v]
    if args.calculate_per_token_loss:
        wrong.append("--calculate-per-token-loss (OPD normalises its loss itself; leave it off)")
    if args.virtual_pipeline_model_parallel_size not in (None, 1):
        wrong.append("--num-layers-per-virtual-pipeline-stage (virtual pipelines are not supported by OPD yet)")
    if wrong:
        raise ValueError(f"Megatron-LM flags contradict the student config{' in ' + source if source else ''}: "
                         + "; ".join(wrong))
