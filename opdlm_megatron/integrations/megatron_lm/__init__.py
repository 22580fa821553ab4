"""OPD inside Megatron-LM's ``pretrain()`` (``megatron/training``, shipped in the megatron-core wheel).

    torchrun --nproc_per_node=8 examples/megatron_lm/pretrain_opd.py \\
        --opd-student /ckpt/qwen3-1.7b-opd-b4 --pretrained-checkpoint /ckpt/qwen3-1.7b-mlm \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --global-batch-size 8 --micro-batch-size 1 --train-iters 160 \\
        --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0 --clip-grad 1.0 \\
        --opd-data-source reasoning_gym --opd-gym-datasets gsm_symbolic --opd-tasks-per-rollout 128 \\
        --save /ckpt/run --save-interval 16 --load /ckpt/run --log-interval 1 --tensorboard-dir /ckpt/run/tb

* ``arguments.py``: the OPD flag group and how flags become the project's ``TrainConfig``;
* ``plugin.py``: model provider, data, forward step and the train-step wrapper that runs rollouts;
* ``checkpoint.py``: Megatron-LM's checkpoint layout (``iter_*/``, ``release/`` + tracker file).

``run`` is what the entry point runs (``commands/pretrain_megatron_lm.py``: ``opdlm-pretrain-megatron-lm``,
``examples/megatron_lm/pretrain_opd.py``).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import List

CPU_FLAGS = {
    # flag -> value (None: a switch). Added on a machine without CUDA unless given: gloo instead of
    # NCCL, CPU initialisation, and the CUDA-only fusions off (they only touch Megatron's own
    # builders and optimizer; OPD's model is built by model.build_model).
    "--distributed-backend": "gloo",
    "--use-cpu-initialization": None,
    "--no-bias-swiglu-fusion": None,
    "--no-bias-dropout-fusion": None,
    "--no-gradient-accumulation-fusion": None,
    "--no-masked-softmax-fusion": None,
    "--no-rope-fusion": None,
    "--no-persist-layer-norm": None,
    "--transformer-impl": "local",
}


def _with_cpu_flags(argv: List[str]) -> List[str]:
    out = list(argv)
    for flag, value in CPU_FLAGS.items():
        if flag not in out:
            out += [flag] if value is None else [flag, value]
    return out


_SAVE_LOCK = []  # the --save directory's lock, held until the process ends


def claim_save_directory(argv: List[str]) -> None:
    """Global rank 0 (torchrun's ``RANK``; torch.distributed starts inside ``pretrain()``) checks that
    ``--save`` is writable and apart from the checkpoints the run reads, and locks it for this run:
    a second run on the same ``--save`` is refused (the other ranks are torn down with it)."""
    import os

    from ...runtime.outputs import check_output
    from ...runtime.run_lock import RunDirectoryLock
    from .flags import pre_parse

    known = pre_parse(argv)
    if not known.save or int(os.environ.get("RANK", "0")) != 0:
        return
    check_output(known.save, "--save", "dir", [("--opd-student", known.opd_student),
                                                ("--opd-teacher", known.opd_teacher),
                                                ("--pretrained-checkpoint", known.pretrained_checkpoint)])
    _SAVE_LOCK.append(RunDirectoryLock(known.save, "--save directory").acquire())


def run(argv: List[str]) -> None:
    """Parses Megatron-LM + OPD flags and runs ``pretrain()`` with OPD. Raises ValueError /
    FileNotFoundError on bad input (``main`` turns them into one line and exit code 2)."""
    import torch

    from ...checkpoint.model import load_model_config
    from ...runtime.platform import MegatronLMCpuShims, in_process_checkpoint_writes
    from .arguments import (check_model_flags, model_flag_defaults, moe_flags, student_config_from_args,
                            train_config_from_args)
    from .flags import add_opd_args, pre_parse_student
    from .plugin import OPDPlugin

    student_dir = pre_parse_student(argv)
    if not student_dir:
        raise ValueError("--opd-student is required: the student's checkpoint directory (opdlm_model_config.json)")
    claim_save_directory(argv)
    base_config = load_model_config(student_dir)
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        argv = _with_cpu_flags(argv)
    if "--eval-iters" not in argv:  # OPD has no validation set; Megatron-LM's default would run 100
        argv = list(argv) + ["--eval-iters", "0"]
    if base_config.query_groups != base_config.num_attention_heads and "--group-query-attention" not in argv:
        # a switch and a flag with a non-None default: args_defaults cannot set them
        argv = list(argv) + ["--group-query-attention"]
        if "--num-query-groups" not in argv:
            argv += ["--num-query-groups", str(base_config.query_groups)]
    argv = list(argv) + moe_flags(base_config, argv)
    defaults = {**model_flag_defaults(base_config), "dataloader_type": "external", "eval_interval": 10 ** 9}
    shims = MegatronLMCpuShims() if on_cpu else contextlib.nullcontext()
    saved_argv = sys.argv
    with shims:
        from megatron.core.enums import ModelType
        from megatron.training import pretrain
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        sys.argv = [saved_argv[0]] + list(argv)
        try:
            args = parse_and_validate_args(extra_args_provider=add_opd_args, args_defaults=defaults)
        finally:
            sys.argv = saved_argv
        if args.dataloader_type != "external":
            raise ValueError(f"--dataloader-type {args.dataloader_type}: OPD feeds its own batches; use external")
        cfg = train_config_from_args(args)
        student_config = student_config_from_args(args, cfg)
        check_model_flags(args, student_config, student_dir)
        plugin = OPDPlugin(cfg, student_config)
        with warnings.catch_warnings():
            # it recommends a ModelConfig over a model provider; OPD's model is model.build_model's
            warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig", category=UserWarning)
            container = pretrain_cfg_container_from_args(args)
        provider = plugin.datasets_provider
        datasets = lambda *a, **k: provider(*a, **k)  # noqa: E731 - pretrain reads attributes off it
        datasets.is_distributed = True
        # synchronous saves write in place (platform.in_process_checkpoint_writes); --async-save keeps
        # megatron's process-safe results queue
        writes = contextlib.nullcontext() if args.async_save else in_process_checkpoint_writes()
        with plugin.installed(), writes:
            pretrain(container, datasets, ModelType.encoder_or_decoder, plugin.forward_step,
                     model_provider=plugin.model_provider)
