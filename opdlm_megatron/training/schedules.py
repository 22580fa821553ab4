"""Schedules: the learning rate over optimizer steps; the rollout-length curriculum and the rollout's
confidence threshold over rollouts.

The learning rate uses megatron-core's ``OptimizerParamScheduler`` (linear warm-up, then cosine
from ``lr`` to ``min_lr``). Megatron's loop evaluates the schedule at the number of steps already
taken, so its first step runs at ``init_lr`` (0); with the paper's 5 warm-up steps that would waste
one of them, so ``lr_for_step`` / ``LRSchedule.set_step`` evaluate it at ``step + 1``: step 0 runs
at lr/5, step 4 at the full lr.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..distill.answers import mix_seed
from ..rollout.config import DecodeConfig
from .config import CurriculumConfig, OptimConfig, RolloutConfig, TrainConfig


def rollout_length(rollout: int, curriculum: CurriculumConfig) -> int:
    """The paper's curriculum (section 4.3) over rollouts r (Table 13 counts "rollouts to reach
    final generation length"): ``min(Lmax, Lmin + floor(r / R_warm * (Lmax - Lmin)))``."""
    if rollout < 0:
        raise ValueError(f"rollout must be >= 0, got {rollout}")
    lmin, lmax, warm = curriculum.min_length, curriculum.max_length, curriculum.warmup_rollouts
    # integer arithmetic: floor(r * (Lmax - Lmin) / R_warm) without float rounding surprises
    return min(lmax, lmin + (rollout * (lmax - lmin)) // warm)


def rollout_threshold(rollout: int, cfg: RolloutConfig) -> float:
    """The confidence threshold of rollout ``r``: ``threshold`` while ``r < hold``, then linear to
    ``final`` over ``ramp`` rollouts (``rollout.threshold_schedule``; fixed when ``final`` is null)."""
    if rollout < 0:
        raise ValueError(f"rollout must be >= 0, got {rollout}")
    schedule = cfg.threshold_schedule
    if schedule.final is None or rollout < schedule.hold_rollouts:
        return cfg.threshold
    progress = min(1.0, (rollout - schedule.hold_rollouts) / schedule.ramp_rollouts)
    return cfg.threshold + (schedule.final - cfg.threshold) * progress


def rollout_decode_config(cfg: TrainConfig, rollout: int, max_new_tokens: int,
                          end_of_turn_ids: Sequence[int]) -> DecodeConfig:
    """How the student decodes rollout ``rollout``: its threshold (``rollout_threshold``), the rollout
    section's sampling, a seed of its own, stopping at the end-of-turn tokens."""
    r = cfg.rollout
    return DecodeConfig(max_new_tokens=max_new_tokens, threshold=rollout_threshold(rollout, r),
                        temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, tokens_per_step=r.tokens_per_step,
                        seed=mix_seed(cfg.seed, rollout, 0, 2), eos_token_ids=list(end_of_turn_ids) or None)


def lr_for_step(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Closed form of the schedule (used by tests and logs); equals what ``LRSchedule`` sets."""
    warmup = optim.warmup_steps
    decay = max(optim.decay_steps or total_steps, warmup + 1)
    s = step + 1
    if warmup > 0 and s <= warmup:
        return optim.lr * s / warmup
    if s > decay:
        return optim.min_lr
    ratio = (s - warmup) / (decay - warmup)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * ratio))


def decay_steps(optim: OptimConfig, total_steps: int) -> int:
    """The cosine's length: ``optim.decay_steps``, else the run's steps; never shorter than the warm-up.
    (The project's trainer only: Megatron-LM's path schedules with its own --lr-* flags.)"""
    decay = optim.decay_steps or total_steps
    if decay < optim.warmup_steps:
        raise ValueError(f"optim.decay_steps ({decay}{'' if optim.decay_steps else ', from train.steps'}) must be "
                         f">= optim.warmup_steps ({optim.warmup_steps}); lower optim.warmup_steps")
    return decay


class LRSchedule:
    """Megatron's ``OptimizerParamScheduler`` driven by our step counter (``set_step`` before each
    optimizer step). Its ``state_dict`` goes into training checkpoints."""

    def __init__(self, optimizer, optim: OptimConfig, total_steps: int) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        decay = decay_steps(optim, total_steps)
        self.scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(decay, optim.warmup_steps + 1),
            lr_decay_style="cosine",
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=max(decay, 1),
            wd_incr_style="constant",
        )

    def set_step(self, step: int) -> float:
        """Sets the optimizer's lr for (0-based) training step ``step``; returns it."""
        self.scheduler.num_steps = step
        self.scheduler.step(increment=1)
        return self.current_lr

    @property
    def current_lr(self) -> float:
        return float(self.scheduler.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
