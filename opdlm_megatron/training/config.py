"""Training configuration: the dataclasses one YAML file fills, with ``key=value`` overrides.

Defaults follow the paper's appendix B (Table 13): one data epoch, 128 tasks per rollout, an
effective training batch of 8 (so one rollout feeds 16 optimizer steps), AdamW with lr 1e-5 -> 1e-6
cosine after 5 warm-up steps, weight decay 0, clip 1.0, block size 4, confidence threshold 0.9,
rollout temperature 1.0, forward KL summed over masked positions with w(t) = 1 (one weight per
supervised token over the global batch), rollout length 100 -> 4000 over 10 rollouts. The same file
sets the parallel layout (TP/PP); data parallelism is whatever the world size leaves.

Each section is a dataclass that checks its own values when it is built (the ``data``, ``tcs`` and
``lift`` sections live with their stage: ``data/config.py``, ``objectives/tcs.py``,
``objectives/lift.py``); ``TrainConfig.validate`` checks what spans sections. Reading YAML files,
overrides and the first layout's keys: ``config_files.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..config.checks import boolean, in_range, non_negative_int, one_of, positive_int
from ..config.choices import (ATTENTION_BACKENDS, DIVERGENCES, LOSS_NORMALIZATIONS, NOISE_LEVELS, QUANT_FORMATS,
                              STATE_SELECTIONS)
from ..config.model import canonical_dtype
from ..config.precision import PrecisionConfig
from ..data.config import DataConfig
from ..model.losses import DivergenceConfig
from ..objectives import get_objective, objective_names
from ..objectives.lift import LIFTConfig
from ..objectives.tcs import TCSConfig
from ..runtime.exit_signals import check_signal_names

logger = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "stop")
WANDB_MODES = ("offline", "online", "disabled")
DISTRIBUTED_OPTIMIZER = ("auto", "on", "off")
MOE_LOAD_BALANCING = ("none", "aux_loss", "seq_aux_loss", "global_aux_loss")


@dataclass
class ModelPaths:
    """Where the weights come from. The teacher defaults to the student's initial checkpoint
    (self-distillation); it may be a larger model with the same (padded) vocabulary."""

    student_checkpoint: str = ""
    teacher_checkpoint: Optional[str] = None
    student_dtype: Optional[str] = None  # e.g. "bfloat16" / "float16"; None: the student checkpoint's dtype
    teacher_dtype: Optional[str] = None  # e.g. "bfloat16"; None: the teacher checkpoint's dtype
    tokenizer: Optional[str] = None  # HF tokenizer dir; None: <student_checkpoint>/tokenizer
    # FP8 through Transformer Engine (precision.py): e.g. {fp8: hybrid} for the student and
    # {fp8: e4m3, fp8_param: true} for the frozen teacher; empty: no FP8
    student_precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    teacher_precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # the attention kernel of the student and the teacher; None: the checkpoint's.
    # "flex" on GPUs: FlexAttention skips masked tiles and keeps no seq x seq score tensor per head, which
    # the dense kernel needs for the [prompt | x0 | xt] mask (opdlm-plan shows the difference); CPU: dense
    attention_backend: Optional[str] = None
    # the teacher's forward runs megatron's causal mask type (Transformer Engine: fused causal attention)
    # when it only scores answers (opd, opd_off) with dense attention; false: the arbitrary mask always
    teacher_causal_kernel: bool = True
    random_init: bool = False  # tests/benchmarks: ignore checkpoints, build both from model_config
    model_config: Optional[dict] = None  # ModelConfig fields for random_init

    def __post_init__(self) -> None:
        if not self.random_init and not self.student_checkpoint:
            raise ValueError("model.student_checkpoint is required (or model.random_init with model.model_config)")
        if self.random_init and not self.model_config:
            raise ValueError("model.random_init needs model.model_config (ModelConfig fields)")
        if self.attention_backend is not None:
            one_of("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        self.student_precision.validate("model.student_precision")
        self.teacher_precision.validate("model.teacher_precision")


    @property
    def tokenizer_dir(self) -> Optional[str]:
        """``tokenizer``, else the student checkpoint's ``tokenizer/``; None when neither is set."""
        if self.tokenizer:
            return self.tokenizer
        return os.path.join(self.student_checkpoint, "tokenizer") if self.student_checkpoint else None


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # megatron's sequence parallelism for student and teacher (activations outside attention and MLP
    # split over the TP ranks along the sequence); needs TP > 1. Rollouts decode outside it (a few
    # columns per forward).
    sequence_parallel: bool = False
    # each row's columns split over this many ranks in the student's training forward (keys and values
    # gathered; model/context_parallel.py); the teacher, rollouts and evaluation run whole rows on each
    context_parallel_size: int = 1
    # mixture-of-experts models: the experts split over this many data-parallel ranks (megatron's
    # expert_model_parallel_size; all-to-all token dispatch, the ranks kept in step: model/expert_parallel.py)
    expert_model_parallel_size: int = 1
    device: str = "auto"  # auto | cuda | cpu
    distributed_optimizer: str = "auto"  # auto: on with CUDA and data parallel > 1

    def __post_init__(self) -> None:
        positive_int("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        positive_int("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        boolean("parallel.sequence_parallel", self.sequence_parallel)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel splits the sequence over the tensor-parallel ranks: it needs "
                             "parallel.tensor_model_parallel_size > 1, got 1")
        positive_int("parallel.context_parallel_size", self.context_parallel_size)
        positive_int("parallel.expert_model_parallel_size", self.expert_model_parallel_size)
        one_of("parallel.distributed_optimizer", self.distributed_optimizer, DISTRIBUTED_OPTIMIZER)



@dataclass
class ThresholdScheduleConfig:
    """Lowers the rollout's confidence threshold over training: ``rollout.threshold`` for the first
    ``hold_rollouts`` rollouts, then linearly to ``final`` over ``ramp_rollouts`` rollouts, then
    ``final``. ``final: null`` (default) keeps the threshold fixed. The authors' config has this
    (``dynamic_threshold_schedule``: 0.9 held 150 rollouts, then toward 0.7), disabled in every
    published run script."""

    final: Optional[float] = None
    hold_rollouts: int = 0
    ramp_rollouts: int = 1

    def __post_init__(self) -> None:
        if self.final is not None:
            in_range("rollout.threshold_schedule.final", self.final, 0.0, 1.0, low_open=True)
        non_negative_int("rollout.threshold_schedule.hold_rollouts", self.hold_rollouts)
        positive_int("rollout.threshold_schedule.ramp_rollouts", self.ramp_rollouts)



@dataclass
class RolloutConfig:
    """Student decoding for on-policy rollouts (the engine's DecodeConfig is built from this).

    ``tasks_per_rollout`` prompts are rolled out at once (paper: 128); their trajectories then feed
    ``tasks_per_rollout / train.global_batch_size`` optimizer steps (paper: 16).
    """

    tasks_per_rollout: int = 128
    threshold: float = 0.9  # dynamic remasking: commit every token above this confidence
    threshold_schedule: ThresholdScheduleConfig = field(default_factory=ThresholdScheduleConfig)
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    tokens_per_step: Optional[int] = None
    # sft / kd_off: the teacher's offline answers, generated once per prompt and cached (0 = greedy)
    teacher_temperature: float = 0.0
    teacher_max_new_tokens: Optional[int] = None  # None: curriculum.max_length

    def __post_init__(self) -> None:
        positive_int("rollout.tasks_per_rollout", self.tasks_per_rollout)
        in_range("rollout.threshold", self.threshold, 0.0, 1.0, low_open=True)
        if not self.temperature >= 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature!r}")
        if not self.teacher_temperature >= 0:
            raise ValueError(f"rollout.teacher_temperature must be >= 0, got {self.teacher_temperature!r}")
        if self.teacher_max_new_tokens is not None:
            positive_int("rollout.teacher_max_new_tokens", self.teacher_max_new_tokens)



@dataclass
class CurriculumConfig:
    """Rollout-length curriculum L_r = min(Lmax, Lmin + floor(r / R_warm * (Lmax - Lmin))), counted in
    rollouts r (paper, Table 13: "rollouts to reach final generation length" = 10)."""

    min_length: int = 100
    max_length: int = 4000
    warmup_rollouts: int = 10

    def __post_init__(self) -> None:
        positive_int("curriculum.min_length", self.min_length)
        positive_int("curriculum.warmup_rollouts", self.warmup_rollouts)
        if self.max_length < self.min_length:
            raise ValueError(f"curriculum.max_length {self.max_length} is below curriculum.min_length {self.min_length}")



@dataclass
class LossConfig:
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: Optional[int] = None
    renormalize_top_k: bool = True
    chunk_tokens: int = 1024
    # which states of the student's trajectories opd / opd_tcs supervise (states.py): "all_rounds" (every
    # round of every block, up to block_size rows per answer: the authors' config default, and what the
    # second data-efficiency study supports: BENCHMARKS.md), "block" (one round per block: every run script
    # the authors published), "trajectory" (Algorithm 1 read literally: one round per trajectory, which
    # rarely supervises partly revealed blocks). A rollout feeds tasks_per_rollout / global_batch_size steps
    # in every mode; with all_rounds a micro-batch of m answers holds up to m x block_size rows.
    state_selection: str = "all_rounds"
    # with several states per answer (all_rounds): the student forwards them packed, one row per answer
    # [prompt | x0 | xt_1 | .. | xt_R] with each copy attending as in a row of its own - the same loss and
    # gradients from about half the tokens at block 4 (benchmarks/packed_states.py); false: one row per state
    pack_states: bool = True
    # "token": one weight per supervised token over the global batch (Algorithm 1 sums the KL over
    # masked positions, w(t) = 1); "row": mean over each row's tokens, then over rows (first layout)
    normalization: str = "token"
    # opd_off / kd_off / mdlm / sft: one noise level t per sequence (paper eq. 2, 6) or per block
    t_sampling: str = "sequence"
    mask_eps: float = 1e-3  # t = eps + (1 - eps) u keeps the 1/t weights finite (LLaDA)
    end_of_turn_ids: Optional[List[int]] = None  # None: the model config's eos_token_ids
    # the end-of-turn token itself carries loss (the authors exclude it: exclude_im_end: True); tokens after
    # it never do
    include_end_of_turn: bool = True

    def __post_init__(self) -> None:
        one_of("loss.state_selection", self.state_selection, STATE_SELECTIONS)
        boolean("loss.pack_states", self.pack_states)
        one_of("loss.divergence", self.divergence, DIVERGENCES)
        one_of("loss.normalization", self.normalization, LOSS_NORMALIZATIONS)
        one_of("loss.t_sampling", self.t_sampling, NOISE_LEVELS)
        in_range("loss.jsd_beta", self.jsd_beta, 0.0, 1.0)
        in_range("loss.mask_eps", self.mask_eps, 0.0, 1.0, high_open=True)

    def divergence_config(self) -> DivergenceConfig:
        """The divergence the student's loss computes (``model/losses.py``), from this section."""
        return DivergenceConfig(kind=self.divergence, jsd_beta=self.jsd_beta, top_k=self.top_k,
                                renormalize_top_k=self.renormalize_top_k, chunk_tokens=self.chunk_tokens)



@dataclass
class MoEConfig:
    """The student router's training terms (mixture-of-experts students; megatron's router computes them).
    Off by default: the student starts from the teacher's routers, which pretraining balanced already, and
    a balancing term pulls the routing toward uniform load rather than toward the teacher, whose output
    distribution is all OPD matches. Megatron's recipes pretrain these families with ``aux_loss`` at 1e-3
    (Qwen3-MoE) to 1e-2 (Mixtral); set them here to keep balancing on while distilling. The frozen teacher
    never computes them (it routes in eval mode). Logged per step either way: the share of routed tokens
    of the busiest and the idlest expert and the share dropped (0: dropless), plus these losses when on."""

    # none | aux_loss (per micro-batch) | seq_aux_loss (per sequence) | global_aux_loss (over the global batch)
    load_balancing: str = "none"
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0  # router z-loss (ST-MoE); 0: off

    def __post_init__(self) -> None:
        one_of("moe.load_balancing", self.load_balancing, MOE_LOAD_BALANCING)
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"moe.{name} must be a number >= 0, got {value!r}")
        if (self.load_balancing == "none") != (self.aux_loss_coeff == 0):
            raise ValueError(f"moe.load_balancing {self.load_balancing!r} and moe.aux_loss_coeff "
                             f"{self.aux_loss_coeff!r} disagree: a balancing loss needs a coefficient > 0, "
                             f"and 'none' takes 0")

    @property
    def router_losses_on(self) -> bool:
        return self.load_balancing != "none" or self.z_loss_coeff > 0

    def transformer_overrides(self) -> dict:
        """The student's TransformerConfig fields for these terms."""
        return dict(moe_router_load_balancing_type=self.load_balancing, moe_aux_loss_coeff=float(self.aux_loss_coeff),
                    moe_z_loss_coeff=float(self.z_loss_coeff) if self.z_loss_coeff > 0 else None)


@dataclass
class QuantizationConfig:
    """Quantization-aware training with NVIDIA ModelOpt: the student's linear layers are fake-quantized to
    ``format`` (``fp8``, ``int8_sq``; ``nvfp4`` on CUDA GPUs) for the whole run, its rollouts decode in that
    precision (on-policy in the deployment precision) and the KL's gradient reaches the weights through the
    quantizers (straight-through); the teacher stays in its own precision. Before the first step the
    quantizers' ranges are calibrated on the student decoding the run's first ``calibration_prompts``
    prompts with the rollout's decoding rule (a resumed run takes them from its checkpoint), and then stay
    fixed. ``exclude``: fnmatch patterns of megatron module names whose linear layers stay unquantized
    (``decoder.layers.0.*``, ``*linear_fc2``); ModelOpt's recipes already leave the output layer, the
    embeddings and the routers unquantized. Checkpoints record the format: they load as quantized students
    (``opdlm-eval``, ``opdlm-generate``, the lm-eval model)."""

    format: Optional[str] = None  # None: off
    calibration_prompts: int = 64
    exclude: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.format is not None:
            one_of("quantization.format", self.format, QUANT_FORMATS)
        positive_int("quantization.calibration_prompts", self.calibration_prompts)
        if not isinstance(self.exclude, list) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"quantization.exclude must be a list of module-name patterns, got {self.exclude!r}")


@dataclass
class TrainLoopConfig:
    """Optimizer steps and batch sizes. ``global_batch_size`` samples (all data-parallel ranks
    together) make one optimizer step (paper: 8), split into micro-batches of ``micro_batch_size``
    rows per rank. ``steps`` = None: as many as ``data.epochs`` passes over the data take."""

    global_batch_size: int = 8
    micro_batch_size: int = 1
    steps: Optional[int] = None
    # a loss above this many times the median of the last loss_spike_window losses logs a warning (0: off)
    loss_spike_factor: float = 5.0
    loss_spike_window: int = 50

    def __post_init__(self) -> None:
        if self.steps is not None:
            positive_int("train.steps", self.steps)
        positive_int("train.global_batch_size", self.global_batch_size)
        positive_int("train.micro_batch_size", self.micro_batch_size)
        positive_int("train.loss_spike_window", self.loss_spike_window)
        if not self.loss_spike_factor >= 0:
            raise ValueError(f"train.loss_spike_factor must be >= 0 (0 turns the detector off), got "
                             f"{self.loss_spike_factor!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size {self.micro_batch_size}")



@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 5
    decay_steps: Optional[int] = None  # None: the run's number of steps
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # fp16 only (megatron's loss scaler): a fixed scale, or None for dynamic scaling from
    # initial_loss_scale (megatron's default 2**32 overflows, and skips, the first dozens of steps)
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000

    def __post_init__(self) -> None:
        if not self.lr > 0 or not self.min_lr >= 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0, got lr={self.lr!r} "
                             f"min_lr={self.min_lr!r}")
        if not self.warmup_steps >= 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.clip_grad >= 0:
            raise ValueError(f"optim.clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad!r}")



@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None  # None: <run_dir>/checkpoints
    save_every: int = 0  # 0: only at the end
    resume: bool = True  # continue from the latest checkpoint in save_dir if there is one
    keep_last: int = 2
    # on these signals: finish the step, save, exit 0 (SLURM sends SIGTERM before preemption / time limit)
    exit_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self) -> None:
        check_signal_names(self.exit_signals)



@dataclass
class LoggingConfig:
    # TensorBoard event files (the `tensorboard` extra) under tensorboard_dir, default <run_dir>/tensorboard
    tensorboard: bool = False
    tensorboard_dir: Optional[str] = None
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "opdlm-megatron"
    log_every: int = 1
    progress_bar: bool = True
    # the teacher's NLL of every answer token (a quality metric); False projects only the supervised positions
    teacher_nll: bool = True

    def __post_init__(self) -> None:
        one_of("logging.wandb_mode", self.wandb_mode, WANDB_MODES)



@dataclass
class TrainConfig:
    """Everything a training run needs; ``objective`` picks OPDLM or one of the paper's baselines."""

    objective: str = "opd"
    block_size: Optional[int] = None  # None: the student's ModelConfig.block_size
    seed: int = 1234
    run_dir: str = "runs/opdlm"
    nan_policy: str = "skip"
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    model: ModelPaths = field(default_factory=ModelPaths)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    tcs: TCSConfig = field(default_factory=TCSConfig)
    lift: LIFTConfig = field(default_factory=LIFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks that span sections (each section checks its own values when it is built)."""
        one_of("objective", self.objective, objective_names())
        one_of("nan_policy", self.nan_policy, NAN_POLICIES)
        if self.block_size is not None:
            positive_int("block_size", self.block_size)
        if self.rollout.tasks_per_rollout % self.train.global_batch_size:
            raise ValueError(
                f"rollout.tasks_per_rollout {self.rollout.tasks_per_rollout} is not a multiple of "
                f"train.global_batch_size {self.train.global_batch_size} (each rollout feeds whole optimizer steps)"
            )
        get_objective(self.objective).validate_config(self)

    def student_architecture(self, config):
        """The student checkpoint's ``ModelConfig`` with this run's overrides (``block_size``,
        ``model.student_dtype``, ``model.attention_backend``): what the trainer builds and the planner plans."""
        if self.block_size is not None:
            config = config.replace(block_size=self.block_size)
        if self.model.student_dtype:
            config = config.replace(params_dtype=canonical_dtype(self.model.student_dtype))
        if self.model.attention_backend:
            config = config.replace(attention_backend=self.model.attention_backend)
        return config

    def end_of_turn_ids(self, config) -> List[int]:
        """The tokens that end an answer: ``loss.end_of_turn_ids``, else the student's EOS ids."""
        return list(self.loss.end_of_turn_ids if self.loss.end_of_turn_ids is not None else config.eos_token_ids)

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps fed by one rollout (paper: 128 / 8 = 16)."""
        return self.rollout.tasks_per_rollout // self.train.global_batch_size

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.save_dir or os.path.join(self.run_dir, "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
