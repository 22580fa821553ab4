"""Training configuration: the dataclasses one YAML file fills, with ``key=value`` overrides.

Defaults follow the paper's appendix B (Table 13): AdamW, lr 1e-5 -> 1e-6 cosine after 5 warm-up
steps, weight decay 0, clip 1.0, block size 4, confidence threshold 0.9, temperature 1.0, forward
KL, rollout length 100 -> 4000 over 10 steps. The same file sets the parallel layout (TP/PP); data
parallelism is whatever the world size leaves.

    config = load_train_config("configs/tiny_cpu.yaml", ["optim.lr=1e-4", "steps=3"])
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import yaml

OBJECTIVES = ("opd", "opd_off", "mdlm", "sft")
NAN_POLICIES = ("skip", "stop")
STATE_SELECTIONS = ("trajectory", "block")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DATA_SOURCES = ("jsonl_chat", "reasoning_gym", "text", "token_ids")
WANDB_MODES = ("offline", "online", "disabled")
DISTRIBUTED_OPTIMIZER = ("auto", "on", "off")


@dataclass
class ModelPaths:
    """Where the weights come from. The teacher defaults to the student's initial checkpoint
    (self-distillation); it may be a larger model with the same (padded) vocabulary."""

    student_checkpoint: str = ""
    teacher_checkpoint: Optional[str] = None
    teacher_dtype: Optional[str] = None  # e.g. "bfloat16"; None: the teacher checkpoint's dtype
    tokenizer: Optional[str] = None  # HF tokenizer dir; None: <student_checkpoint>/tokenizer
    random_init: bool = False  # tests/benchmarks: ignore checkpoints, build both from model_config
    model_config: Optional[dict] = None  # ModelConfig fields for random_init


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
    max_prompt_tokens: int = 512
    max_response_tokens: int = 512  # text / mdlm: answer part cropped to this many tokens
    shuffle: bool = True
    seed: int = 1234
    system_prompt: Optional[str] = None


@dataclass
class RolloutConfig:
    """Student decoding for on-policy rollouts (the engine's DecodeConfig is built from this)."""

    threshold: float = 0.9  # dynamic remasking: commit every token above this confidence
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    tokens_per_step: Optional[int] = None
    # SFT baseline: how the teacher answers the prompts (0 = greedy)
    teacher_temperature: float = 0.0


@dataclass
class CurriculumConfig:
    """Rollout-length curriculum L_s = min(Lmax, Lmin + floor(s / S_warm * (Lmax - Lmin)))."""

    min_length: int = 100
    max_length: int = 4000
    warmup_steps: int = 10


@dataclass
class LossConfig:
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: Optional[int] = None
    renormalize_top_k: bool = True
    chunk_tokens: int = 1024
    state_selection: str = "trajectory"  # paper Alg. 1; "block": one round per block
    end_of_turn_ids: Optional[List[int]] = None  # None: the model config's eos_token_ids
    include_end_of_turn: bool = True


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


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None  # None: <run_dir>/checkpoints
    save_every: int = 0  # 0: only at the end
    resume: bool = True  # continue from the latest checkpoint in save_dir if there is one
    keep_last: int = 2


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "opdlm-megatron"
    log_every: int = 1
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """Everything a training run needs; ``objective`` picks OPDLM or one of the paper's baselines."""

    objective: str = "opd"
    steps: int = 100
    prompts_per_step: int = 8  # global: rollouts per optimizer step
    micro_batch_size: int = 1
    block_size: Optional[int] = None  # None: the student's ModelConfig.block_size
    seed: int = 1234
    run_dir: str = "runs/opdlm"
    nan_policy: str = "skip"
    model: ModelPaths = field(default_factory=ModelPaths)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
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

        one_of("objective", self.objective, OBJECTIVES)
        one_of("nan_policy", self.nan_policy, NAN_POLICIES)
        one_of("loss.state_selection", self.loss.state_selection, STATE_SELECTIONS)
        one_of("loss.divergence", self.loss.divergence, DIVERGENCES)
        one_of("data.source", self.data.source, DATA_SOURCES)
        one_of("logging.wandb_mode", self.logging.wandb_mode, WANDB_MODES)
        one_of("parallel.distributed_optimizer", self.parallel.distributed_optimizer, DISTRIBUTED_OPTIMIZER)
        positive("steps", self.steps)
        positive("prompts_per_step", self.prompts_per_step)
        positive("micro_batch_size", self.micro_batch_size)
        positive("curriculum.min_length", self.curriculum.min_length)
        positive("curriculum.warmup_steps", self.curriculum.warmup_steps)
        if self.block_size is not None:
            positive("block_size", self.block_size)
        if self.curriculum.max_length < self.curriculum.min_length:
            raise ValueError(
                f"curriculum.max_length {self.curriculum.max_length} is below "
                f"curriculum.min_length {self.curriculum.min_length}"
            )
        if self.prompts_per_step % self.micro_batch_size:
            raise ValueError(
                f"prompts_per_step {self.prompts_per_step} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if not 0.0 < self.rollout.threshold <= 1.0:
            raise ValueError(f"rollout.threshold must be in (0, 1], got {self.rollout.threshold!r}")
        if self.rollout.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.rollout.temperature!r}")
        if not 0.0 <= self.loss.jsd_beta <= 1.0:
            raise ValueError(f"loss.jsd_beta must be in [0, 1], got {self.loss.jsd_beta!r}")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise ValueError(
                f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0, got lr={self.optim.lr!r} "
                f"min_lr={self.optim.min_lr!r}"
            )
        if self.optim.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps!r}")
        if self.optim.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0 (0 disables clipping), got {self.optim.clip_grad!r}")
        if self.objective == "mdlm" and self.data.source not in ("text", "token_ids"):
            raise ValueError(
                f"objective 'mdlm' trains on a text/response dataset; data.source must be 'text' or "
                f"'token_ids', got {self.data.source!r}"
            )
        if not self.model.random_init and not self.model.student_checkpoint:
            raise ValueError("model.student_checkpoint is required (or model.random_init with model.model_config)")
        if self.model.random_init and not self.model.model_config:
            raise ValueError("model.random_init needs model.model_config (ModelConfig fields)")

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
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}" if where else name)
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


def train_config_from_dict(data: dict, overrides: Sequence[str] = ()) -> TrainConfig:
    return _build(TrainConfig, apply_overrides(data, overrides), "")


def load_train_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML training config and applies ``key=value`` overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return train_config_from_dict(data, overrides)
