"""Training configuration: the dataclasses one YAML file fills, with ``key=value`` overrides.

Defaults follow the paper's appendix B (Table 13): one data epoch, 128 tasks per rollout, an
effective training batch of 8 (so one rollout feeds 16 optimizer steps), AdamW with lr 1e-5 -> 1e-6
cosine after 5 warm-up steps, weight decay 0, clip 1.0, block size 4, confidence threshold 0.9,
rollout temperature 1.0, forward KL summed over masked positions with w(t) = 1 (one weight per
supervised token over the global batch), rollout length 100 -> 4000 over 10 rollouts. The same file
sets the parallel layout (TP/PP); data parallelism is whatever the world size leaves.

    config = load_train_config("configs/tiny_cpu.yaml", ["optim.lr=1e-4", "train.steps=3"])

Configs written for the first layout (one rollout of ``prompts_per_step`` prompts per optimizer
step, top-level ``steps`` / ``micro_batch_size``, ``curriculum.warmup_steps``) still load: those
keys are translated (``upgrade_legacy_keys``) with a warning naming the new keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import yaml

from .precision import PrecisionConfig

logger = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "stop")
STATE_SELECTIONS = ("trajectory", "block", "all_rounds")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DATA_SOURCES = ("jsonl_chat", "reasoning_gym", "text", "token_ids")
WANDB_MODES = ("offline", "online", "disabled")
DISTRIBUTED_OPTIMIZER = ("auto", "on", "off")
LOSS_NORMALIZATIONS = ("token", "row")
T_SAMPLING = ("sequence", "block")
LONG_PROMPT_POLICIES = ("skip", "error")
LIFT_WEIGHTINGS = ("inverse_t", "cart")


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
    device: str = "auto"  # auto | cuda | cpu
    distributed_optimizer: str = "auto"  # auto: on with CUDA and data parallel > 1


@dataclass
class DataConfig:
    """Prompt (or, for ``mdlm``, text/response) source; see ``data.py``."""

    source: str = "jsonl_chat"
    path: Optional[str] = None  # jsonl_chat / text / token_ids
    gym_datasets: List[str] = field(default_factory=lambda: ["basic_arithmetic"])
    gym_size: int = 1000
    # per-dataset reasoning-gym options (difficulty), e.g. {"basic_arithmetic": {"max_terms": 2}}
    gym_options: dict = field(default_factory=dict)
    max_prompt_tokens: int = 512
    # a prompt longer than max_prompt_tokens is never cut: "skip" drops it (counted in the metrics
    # as data/skipped_long_prompts), "error" stops with the prompt's location
    long_prompts: str = "skip"
    max_response_tokens: int = 512  # text / mdlm: answer part cropped to this many tokens
    shuffle: bool = True
    seed: int = 1234
    epochs: float = 1.0  # passes over the data (paper: 1; OPDLM-MATH: 10); sets the steps unless train.steps does
    system_prompt: Optional[str] = None
    # Qwen3-style templates think by default; the paper's students answer without thinking
    enable_thinking: bool = False


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


@dataclass
class CurriculumConfig:
    """Rollout-length curriculum L_r = min(Lmax, Lmin + floor(r / R_warm * (Lmax - Lmin))), counted in
    rollouts r (paper, Table 13: "rollouts to reach final generation length" = 10)."""

    min_length: int = 100
    max_length: int = 4000
    warmup_rollouts: int = 10


@dataclass
class LossConfig:
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: Optional[int] = None
    renormalize_top_k: bool = True
    chunk_tokens: int = 1024
    # which states of the student's trajectories opd / opd_tcs supervise (states.py): "trajectory" (paper,
    # Algorithm 1: one round per trajectory), "block" (one round per block: every run script the authors
    # published), "all_rounds" (every round of every block, up to block_size rows per answer: their config's
    # default). A rollout feeds tasks_per_rollout / global_batch_size steps in every mode.
    state_selection: str = "trajectory"
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


@dataclass
class TCSConfig:
    """``opd_tcs`` / ``tcs``: Target Concrete Score targets on routed positions (``objectives/tcs.py``).
    ``weight`` is lambda, ``candidates`` K (the teacher's top-K scored with branches of the rest of
    the block), ``route_prob`` the routing probability where teacher and student argmax agree."""

    weight: float = 1.0
    candidates: int = 8
    route_prob: float = 0.1
    # None: the unbiased lambda / pi weights; a number caps them (biased, but with a cap <= 1 every
    # routed target stays a mixture of q_OPD and q_hat, so no loss term is unbounded below)
    max_weight: Optional[float] = None


@dataclass
class LIFTConfig:
    """``lift`` / ``lift2``: learnability-informed masking (``objectives/lift.py``). ``rho_min`` is
    the lower end of the superset's extra rate rho ~ U(rho_min, 1 - t); ``weighting`` "inverse_t"
    (LIFT's 1/t) or "cart" (the CART baseline's distance weights with ``cart_p``)."""

    rho_min: float = 0.1
    weighting: str = "inverse_t"
    cart_p: float = 0.1


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


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None  # None: <run_dir>/checkpoints
    save_every: int = 0  # 0: only at the end
    resume: bool = True  # continue from the latest checkpoint in save_dir if there is one
    keep_last: int = 2
    # on these signals: finish the step, save, exit 0 (SLURM sends SIGTERM before preemption / time limit)
    exit_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


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
    tcs: TCSConfig = field(default_factory=TCSConfig)
    lift: LIFTConfig = field(default_factory=LIFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def one_of(name: str, value: Any, allowed: Sequence) -> None:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")

        def positive(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        from .objectives import get_objective, objective_names

        one_of("objective", self.objective, objective_names())
        one_of("nan_policy", self.nan_policy, NAN_POLICIES)
        one_of("loss.state_selection", self.loss.state_selection, STATE_SELECTIONS)
        one_of("loss.divergence", self.loss.divergence, DIVERGENCES)
        one_of("loss.normalization", self.loss.normalization, LOSS_NORMALIZATIONS)
        one_of("loss.t_sampling", self.loss.t_sampling, T_SAMPLING)
        one_of("lift.weighting", self.lift.weighting, LIFT_WEIGHTINGS)
        positive("tcs.candidates", self.tcs.candidates)
        if not 0.0 < self.tcs.route_prob <= 1.0:
            raise ValueError(f"tcs.route_prob must be in (0, 1], got {self.tcs.route_prob!r}")
        if self.tcs.max_weight is not None and self.tcs.max_weight <= 0:
            raise ValueError(f"tcs.max_weight must be > 0 or null, got {self.tcs.max_weight!r}")
        if self.tcs.weight < 0:
            raise ValueError(f"tcs.weight must be >= 0, got {self.tcs.weight!r}")
        if not 0.0 <= self.lift.rho_min < 1.0:
            raise ValueError(f"lift.rho_min must be in [0, 1), got {self.lift.rho_min!r}")
        if not 0.0 < self.lift.cart_p < 1.0:
            raise ValueError(f"lift.cart_p must be in (0, 1), got {self.lift.cart_p!r}")
        one_of("data.source", self.data.source, DATA_SOURCES)
        one_of("data.long_prompts", self.data.long_prompts, LONG_PROMPT_POLICIES)
        one_of("logging.wandb_mode", self.logging.wandb_mode, WANDB_MODES)
        one_of("parallel.distributed_optimizer", self.parallel.distributed_optimizer, DISTRIBUTED_OPTIMIZER)
        if self.train.steps is not None:
            positive("train.steps", self.train.steps)
        positive("parallel.tensor_model_parallel_size", self.parallel.tensor_model_parallel_size)
        positive("parallel.pipeline_model_parallel_size", self.parallel.pipeline_model_parallel_size)
        positive("train.global_batch_size", self.train.global_batch_size)
        positive("train.micro_batch_size", self.train.micro_batch_size)
        positive("train.loss_spike_window", self.train.loss_spike_window)
        if self.train.loss_spike_factor < 0:
            raise ValueError(f"train.loss_spike_factor must be >= 0 (0 turns the detector off), got "
                             f"{self.train.loss_spike_factor!r}")
        positive("rollout.tasks_per_rollout", self.rollout.tasks_per_rollout)
        positive("curriculum.min_length", self.curriculum.min_length)
        positive("curriculum.warmup_rollouts", self.curriculum.warmup_rollouts)
        positive("data.max_prompt_tokens", self.data.max_prompt_tokens)
        if self.rollout.teacher_max_new_tokens is not None:
            positive("rollout.teacher_max_new_tokens", self.rollout.teacher_max_new_tokens)
        if self.block_size is not None:
            positive("block_size", self.block_size)
        if not isinstance(self.data.epochs, (int, float)) or isinstance(self.data.epochs, bool) or self.data.epochs <= 0:
            raise ValueError(f"data.epochs must be a positive number, got {self.data.epochs!r}")
        if self.curriculum.max_length < self.curriculum.min_length:
            raise ValueError(
                f"curriculum.max_length {self.curriculum.max_length} is below "
                f"curriculum.min_length {self.curriculum.min_length}"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size {self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.train.micro_batch_size}"
            )
        if self.rollout.tasks_per_rollout % self.train.global_batch_size:
            raise ValueError(
                f"rollout.tasks_per_rollout {self.rollout.tasks_per_rollout} is not a multiple of "
                f"train.global_batch_size {self.train.global_batch_size} (each rollout feeds whole optimizer steps)"
            )
        if not 0.0 < self.rollout.threshold <= 1.0:
            raise ValueError(f"rollout.threshold must be in (0, 1], got {self.rollout.threshold!r}")
        schedule = self.rollout.threshold_schedule
        if schedule.final is not None and not 0.0 < schedule.final <= 1.0:
            raise ValueError(f"rollout.threshold_schedule.final must be in (0, 1] or null, got {schedule.final!r}")
        if not isinstance(schedule.hold_rollouts, int) or isinstance(schedule.hold_rollouts, bool) \
                or schedule.hold_rollouts < 0:
            raise ValueError(f"rollout.threshold_schedule.hold_rollouts must be an integer >= 0, got "
                             f"{schedule.hold_rollouts!r}")
        positive("rollout.threshold_schedule.ramp_rollouts", schedule.ramp_rollouts)
        if self.rollout.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.rollout.temperature!r}")
        if self.rollout.teacher_temperature < 0:
            raise ValueError(f"rollout.teacher_temperature must be >= 0, got {self.rollout.teacher_temperature!r}")
        if not 0.0 <= self.loss.jsd_beta <= 1.0:
            raise ValueError(f"loss.jsd_beta must be in [0, 1], got {self.loss.jsd_beta!r}")
        if not 0.0 <= self.loss.mask_eps < 1.0:
            raise ValueError(f"loss.mask_eps must be in [0, 1), got {self.loss.mask_eps!r}")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise ValueError(
                f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0, got lr={self.optim.lr!r} "
                f"min_lr={self.optim.min_lr!r}"
            )
        if self.optim.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps!r}")
        if self.optim.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0 (0 disables clipping), got {self.optim.clip_grad!r}")
        if not self.model.random_init and not self.model.student_checkpoint:
            raise ValueError("model.student_checkpoint is required (or model.random_init with model.model_config)")
        if self.model.random_init and not self.model.model_config:
            raise ValueError("model.random_init needs model.model_config (ModelConfig fields)")
        from .exit_signals import check_signal_names

        check_signal_names(self.checkpoint.exit_signals)
        if self.model.attention_backend is not None:
            from .config import ATTENTION_BACKENDS

            one_of("model.attention_backend", self.model.attention_backend, ATTENTION_BACKENDS)
        self.model.student_precision.validate("model.student_precision")
        self.model.teacher_precision.validate("model.teacher_precision")
        get_objective(self.objective).validate_config(self)

    def student_architecture(self, config):
        """The student checkpoint's ``ModelConfig`` with this run's overrides (``block_size``,
        ``model.student_dtype``, ``model.attention_backend``): what the trainer builds and the planner plans."""
        from .config import canonical_dtype

        if self.block_size is not None:
            config = config.replace(block_size=self.block_size)
        if self.model.student_dtype:
            config = config.replace(params_dtype=canonical_dtype(self.model.student_dtype))
        if self.model.attention_backend:
            config = config.replace(attention_backend=self.model.attention_backend)
        return config

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps fed by one rollout (paper: 128 / 8 = 16)."""
        return self.rollout.tasks_per_rollout // self.train.global_batch_size

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.save_dir or os.path.join(self.run_dir, "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------- loading
def _build(cls, data: dict, where: str):
    """Instantiates dataclass ``cls`` from ``data``, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {where + ' ' if where else ''}config keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(sub, type):
            path = f"{where}.{name}" if where else name
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config section {path!r} must be a mapping of keys, got {type(value).__name__} "
                                 f"{value!r}")
            kwargs[name] = _build(sub, value or {}, path)
        else:
            kwargs[name] = _coerce(value, str(fields[name].type), f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """YAML reads ``3e-4`` as a string (YAML 1.1 wants ``3.0e-4``): convert numbers for float fields."""
    if isinstance(value, str) and annotation in ("float", "Optional[float]"):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and annotation in ("float", "Optional[float]"):
        return float(value)
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``dotted.key=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


LEGACY_KEYS = {
    "steps": "train.steps",
    "micro_batch_size": "train.micro_batch_size",
    "prompts_per_step": "rollout.tasks_per_rollout and train.global_batch_size",
    "curriculum.warmup_steps": "curriculum.warmup_rollouts",
}


def upgrade_legacy_keys(data: dict) -> dict:
    """Translates the first layout's keys: ``prompts_per_step`` P (one rollout of P prompts per
    optimizer step) becomes ``tasks_per_rollout = global_batch_size = P``, which reproduces those
    runs; ``steps`` / ``micro_batch_size`` move under ``train``; ``curriculum.warmup_steps`` (which
    counted steps = rollouts there) becomes ``curriculum.warmup_rollouts``."""
    data = dict(data)
    for section in ("train", "rollout", "curriculum"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping of keys, got "
                             f"{type(data[section]).__name__} {data[section]!r}")
    found = []
    train = dict(data.get("train") or {})
    rollout = dict(data.get("rollout") or {})
    curriculum = dict(data.get("curriculum") or {})
    for old, new in (("steps", "steps"), ("micro_batch_size", "micro_batch_size")):
        if old in data:
            found.append(old)
            train.setdefault(new, data.pop(old))
    if "prompts_per_step" in data:
        found.append("prompts_per_step")
        value = data.pop("prompts_per_step")
        rollout.setdefault("tasks_per_rollout", value)
        train.setdefault("global_batch_size", value)
    if "warmup_steps" in curriculum:
        found.append("curriculum.warmup_steps")
        curriculum.setdefault("warmup_rollouts", curriculum.pop("warmup_steps"))
    if not found:
        return data
    logger.warning("config keys %s are from the first config layout; read as %s", found,
                   [LEGACY_KEYS[k] for k in found])
    for key, value in (("train", train), ("rollout", rollout), ("curriculum", curriculum)):
        if value or key in data:
            data[key] = value
    return data


def train_config_from_dict(data: dict, overrides: Sequence[str] = ()) -> TrainConfig:
    return _build(TrainConfig, upgrade_legacy_keys(apply_overrides(data, overrides)), "")


def load_train_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML training config and applies ``key=value`` overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ValueError(f"{path} is not valid YAML{line}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return train_config_from_dict(data, overrides)
