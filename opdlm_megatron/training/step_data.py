"""What each optimizer step trains on: answers -> states -> teacher targets (steps 1-3 of the loop).

``StepData`` is shared by the project's own loop (``trainer.Trainer``) and Megatron-LM's
``pretrain()`` (``megatron_lm/``), so both train on exactly the same batches for the same config,
seed and parallel layout:

1. **answers** (once per rollout; no grad): ``rollout.tasks_per_rollout`` samples are drawn (the same
   on every rank) and answered by the source the objective names (``answers.py``); every rank holds
   the whole rollout (the *rollout buffer*).
2. **states** (every step): the step's ``train.global_batch_size`` rows of the buffer become a
   ``SupervisedBatch`` (``Objective.build``); this data-parallel rank keeps its share of the rows.
3. **teacher** (distillation objectives): the frozen ARLM's targets of the supervised positions,
   refined by the objective where it says so (TCS's corrected targets on routed positions).

Randomness derives from ``(seed, rollout)`` and ``(seed, step)``, never from the rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from ..config.model import ModelConfig
from ..data.samples import Sample, SampleStream
from ..distill.answers import DatasetAnswers, RolloutFn, StudentRollouts, TeacherAnswers, mix_seed
from ..distill.states import partially_masked_share
from ..distill.teacher import FrozenTeacher, TeacherTargets
from ..model import losses
from ..objectives import StateContext, TargetTools
from ..objectives.base import Objective, SupervisedBatch
from ..objectives.scoring import StudentScorer
from ..rollout.config import DecodeConfig
from ..rollout.types import RolloutResult
from ..runtime.distributed import data_parallel_mean, data_parallel_share
from .config import TrainConfig
from .metrics import PhaseTimers
from .schedules import rollout_decode_config, rollout_length, rollout_threshold

logger = logging.getLogger(__name__)


@dataclass
class RolloutBuffer:
    """One rollout's answers (global, identical on every rank) and how far its steps have got."""

    rollout: int
    answers: RolloutResult
    generation_length: int  # the length setting the answers were produced with (-1: dataset)
    next_update: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)

    def state(self) -> Dict:
        return {"rollout": self.rollout, "generation_length": self.generation_length,
                "next_update": self.next_update, "metrics": dict(self.metrics)}


@dataclass
class StepInputs:
    """One step's supervised batch (this rank's rows), the teacher's targets for it (None for
    cross-entropy objectives) and the metrics of producing them (the same on every rank)."""

    batch: SupervisedBatch
    targets: Optional[TeacherTargets]
    metrics: Dict[str, float]
    buffer: RolloutBuffer


class StepData:
    """Produces ``StepInputs`` step after step; ``done_step`` marks a step's rows as used."""

    def __init__(self, cfg: TrainConfig, objective: Objective, student, config: ModelConfig,
                 teacher: Optional[FrozenTeacher], samples: Sequence[Sample], rollout_fn: RolloutFn,
                 rank: int, timers: Optional[PhaseTimers] = None) -> None:
        self.cfg = cfg
        self.objective = objective
        self.student = student
        self.config = config
        self.teacher = teacher
        self.rollout_fn = rollout_fn
        self.rank = rank
        self.timers = timers or PhaseTimers()
        self.end_of_turn_ids = cfg.end_of_turn_ids(config)
        # the model being trained, no grad, for objectives that read it (LIFT's scores, TCS's routing)
        self.score_student = StudentScorer(student, config, cfg.train.micro_batch_size, cfg.loss.chunk_tokens)
        self.state_context = StateContext(
            mask_token_id=config.mask_token_id, block_size=config.block_size,
            end_of_turn_ids=self.end_of_turn_ids, include_end_of_turn=cfg.loss.include_end_of_turn,
            state_selection=cfg.loss.state_selection, t_sampling=cfg.loss.t_sampling, mask_eps=cfg.loss.mask_eps,
            micro_batch_size=cfg.train.micro_batch_size, score_student=self.score_student,
        )
        objective.configure(cfg)
        self.stream = SampleStream(samples, cfg.data.seed, cfg.data.shuffle)
        self.answers = self._answer_source()
        self.rollouts_started = 0
        self.buffer: Optional[RolloutBuffer] = None
        self._resume_update = 0

    # ----------------------------------------------------------------------------- sources
    def _answer_source(self):
        cfg, source = self.cfg, self.objective.answers
        if source == "dataset":
            return DatasetAnswers(self.config.pad_token_id or 0)
        if source == "teacher":
            max_new = cfg.rollout.teacher_max_new_tokens or cfg.curriculum.max_length
            return TeacherAnswers(self.teacher, max_new, cfg.rollout.teacher_temperature, cfg.seed,
                                  self.end_of_turn_ids, cfg.run_dir, self.rollout_fn, self.rank == 0)
        return StudentRollouts(self.student, self.config, self.decode_config,
                               lambda r: rollout_length(r, cfg.curriculum), self.rollout_fn)

    def decode_config(self, rollout: int, max_new_tokens: int) -> DecodeConfig:
        return rollout_decode_config(self.cfg, rollout, max_new_tokens, self.end_of_turn_ids)

    def _step_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.cfg.seed, step, 0, 1))

    # ------------------------------------------------------------------------------ a step
    def _next_rollout(self) -> RolloutBuffer:
        """Draws the next ``tasks_per_rollout`` samples and produces their answers."""
        rollout = self.rollouts_started
        ids = self.stream.next_indices(self.cfg.rollout.tasks_per_rollout)
        samples = [self.stream.samples[i] for i in ids]
        answers, length = self.answers.produce(samples, ids, rollout)
        self.rollouts_started += 1
        lengths = answers.answer_valid.sum(-1).double()
        metrics = {
            "rollout": float(rollout),
            "rollout_len": float(length) if self.objective.uses_curriculum else float("nan"),
            "rollout_threshold": rollout_threshold(rollout, self.cfg.rollout) if self.objective.uses_curriculum
            else float("nan"),
            "committed_per_forward": float((lengths / answers.num_rounds.clamp_min(1).double()).mean())
            if self.objective.uses_curriculum else float("nan"),
            "forward_passes": float(answers.num_forward_passes),
            "finished_fraction": float(answers.finished.double().mean()),
        }
        return RolloutBuffer(rollout, answers, length, 0, metrics)

    def _supervised_batch(self, buffer: RolloutBuffer, step: int) -> SupervisedBatch:
        """This rank's rows of the step's states (built on the step's global rows)."""
        size = self.cfg.train.global_batch_size
        rows = torch.arange(buffer.next_update * size, (buffer.next_update + 1) * size)
        global_batch = self.objective.build(buffer.answers.rows(rows), self._step_generator(step), self.state_context)
        start, end = data_parallel_share(size)
        return global_batch.answer_share(start, end)

    def _teacher_targets(self, batch: SupervisedBatch):
        """The teacher's targets of the supervised positions (and its NLL of the answers, as a metric).

        The teacher scores each answer once: rows that are states of one answer (``all_rounds``) share
        its x0, so the targets of the union of their supervised positions serve all of them."""
        first, inverse = batch.answer_rows()
        r = batch.answers.rows(first, trim=False)
        positions = torch.zeros(r.answer_ids.shape, dtype=torch.int32).index_add_(
            0, inverse, batch.supervised.to(torch.int32)) > 0
        kept = losses.answer_loss_mask(r.answer_ids, r.answer_valid, self.end_of_turn_ids,
                                       self.cfg.loss.include_end_of_turn)
        targets = self.teacher.targets(
            r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, positions,
            self.cfg.train.micro_batch_size, top_k=self.cfg.loss.top_k, chunk_tokens=self.cfg.loss.chunk_tokens,
            nll_positions=kept if self.cfg.logging.teacher_nll else None)
        metrics = {}
        if self.cfg.logging.teacher_nll:
            metrics["teacher_nll"] = float(losses.row_mean(targets.answer_nll, kept)) if kept.any() else 0.0
        if batch.groups is not None:
            targets = targets.for_rows(inverse)
        return targets, metrics

    def _refined_targets(self, batch: SupervisedBatch, targets):
        """The objective's refinement of the teacher's targets (TCS), timed apart from the teacher."""
        if type(self.objective).refine_targets is Objective.refine_targets:
            return targets, {}
        tools = TargetTools(self.teacher, self.score_student, self.config.block_size, self.cfg.train.micro_batch_size,
                            self.cfg.loss.chunk_tokens, self.cfg.loss.top_k, self.cfg.loss.renormalize_top_k)
        with self.timers.phase("refine_targets"):
            return self.objective.refine_targets(batch, targets, tools)

    def fast_forward(self, steps_done: int) -> None:
        """Continues as a run that has taken ``steps_done`` steps would, from its data and rollout
        counters alone (no saved rollout buffer): inside a rollout, that rollout is produced again
        with the current weights and its first steps skipped."""
        per_rollout = self.cfg.updates_per_rollout
        done = steps_done // per_rollout
        for _ in range(done):
            self.stream.next_indices(self.cfg.rollout.tasks_per_rollout)
        self.rollouts_started = done
        self._resume_update = steps_done % per_rollout
        self.buffer = None

    def prepare(self, step: int) -> StepInputs:
        """Step ``step``'s inputs (starting a rollout when the last one is used up). Collective."""
        if self.buffer is None or self.buffer.next_update >= self.cfg.updates_per_rollout:
            with self.timers.phase("rollout"):
                self.buffer = self._next_rollout()
            self.buffer.next_update, self._resume_update = self._resume_update, 0
        buffer = self.buffer
        with self.timers.phase("states"):
            batch = self._supervised_batch(buffer, step)
        r = batch.answers
        first = batch.answer_rows()[0]
        local = {
            "answer_tokens": float(r.answer_valid[first].sum(-1).double().mean()),
            "rows_per_answer": batch.batch_size / max(1, first.numel()),
            "partially_masked_share": partially_masked_share(batch.xt, batch.supervised, r.answer_valid,
                                                             self.config.block_size, self.config.mask_token_id)
            if batch.xt is not None else float("nan"),
        }
        targets = None
        if batch.distill:
            with self.timers.phase("teacher"):
                targets, teacher_metrics = self._teacher_targets(batch)
            targets, refined = self._refined_targets(batch, targets)
            local.update(teacher_metrics, **refined)
        return StepInputs(batch, targets, {**buffer.metrics, **data_parallel_mean(local)}, buffer)

    def paper_tokens(self, buffer: RolloutBuffer) -> float:
        """The paper's training tokens T of one step (Table 1, eq. 7): samples x generation length;
        for dataset answers (nothing generated) the answers' own lengths."""
        if buffer.generation_length >= 0:
            return float(self.cfg.train.global_batch_size * buffer.generation_length)
        return self.answer_tokens(buffer)

    def answer_tokens(self, buffer: RolloutBuffer) -> float:
        """The answer tokens of the step's samples (all ranks): what was generated, not the length limit."""
        size = self.cfg.train.global_batch_size
        rows = torch.arange(buffer.next_update * size, (buffer.next_update + 1) * size)
        return float(buffer.answers.answer_valid[rows].sum())

    def done_step(self) -> None:
        """The current step's rows are used (the next ``prepare`` takes the following ones)."""
        self.buffer.next_update += 1

    @property
    def mid_rollout(self) -> bool:
        return self.buffer is not None and self.buffer.next_update < self.cfg.updates_per_rollout
