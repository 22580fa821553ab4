"""The training loop: one pipeline for every objective (OPD, its ablations, baselines, ``ar``).

A rollout, then its optimizer steps, top to bottom (``Trainer.train_step``); steps 1-3 are
``step_data.StepData``, shared with the Megatron-LM ``pretrain()`` path (``megatron_lm/``):

1. **answers** (once per rollout; no grad): ``rollout.tasks_per_rollout`` samples are drawn (the same
   on every rank) and answered by the source the objective names (``answers.py``): the student's
   block-diffusion rollouts at the curriculum's length, the teacher's cached offline answers, or the
   dataset's responses. Data-parallel ranks share the work and gather the results, so every rank
   holds the whole rollout (the *rollout buffer*).
2. **states** (every step): the step's ``train.global_batch_size`` rows of the buffer become a
   ``SupervisedBatch`` (``Objective.build``: the supervised state xt, which tokens carry loss,
   weights); this rank keeps its share of the rows.
3. **teacher** (distillation objectives): one causal forward of the frozen ARLM over
   ``[prompt; x0]`` gives the targets of the supervised positions only (``FrozenTeacher.targets``).
4. **student**: forward/backward through megatron-core's ``get_forward_backward_func`` (pipeline
   schedules included); megatron DDP reduces the gradients.
5. **optimizer**: a non-finite loss is reported and the update skipped (or the run stopped);
   otherwise the learning rate is set for this step and megatron's optimizer clips and steps.

The paper's schedule (Table 13): 128 tasks per rollout feed 128 / 8 = 16 optimizer steps; the
rollout-length curriculum advances per rollout. Randomness derives from ``(seed, rollout)`` (the
rollout's sampling noise, keyed by global row) and ``(seed, step)`` (the states), never from the
data-parallel rank, so every parallel layout and a resumed run make the same choices.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..checkpoint.model import load_model_checkpoint, load_model_config
from ..checkpoint.training import (
    latest_checkpoint,
    load_training_checkpoint,
    remove_stale_partials,
    resume_config_changes,
    save_training_checkpoint,
)
from ..config.model import ModelConfig
from ..data.samples import Sample, check_token_ids
from ..distill.answers import RolloutFn, engine_rollout
from ..objectives import get_objective
from ..runtime.console import attach_log_file, error_message
from ..runtime.distributed import broadcast_object
from ..runtime.exit_signals import ExitSignals
from ..runtime.outputs import check_output
from ..runtime.platform import compute_device
from ..runtime.run_lock import RunDirectoryLock
from .build import (build_student_model, build_teacher, load_run_samples, quantize_student, step_record,
                    student_architecture)
from .config import TrainConfig
from .metrics import LossSpikeDetector, MetricsLogger, PhaseTimers, compact, progress_bar
from .router_stats import RouterStatistics
from .schedules import LRSchedule
from .step_data import RolloutBuffer, StepData
from .student import student_step

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "NonFiniteLossError", "engine_rollout", "wrap_and_build_optimizer"]


class NonFiniteLossError(RuntimeError):
    """Raised with ``nan_policy="stop"`` when a step's loss is NaN or infinite."""


# --------------------------------------------------------------------------- model + optimizer
def wrap_and_build_optimizer(student, cfg: TrainConfig, data_parallel_size: int, on_cuda: bool):
    """Wraps the student in megatron DDP and builds megatron's AdamW optimizer for it.

    The distributed optimizer (optimizer state sharded over data(-and-context)-parallel ranks,
    ``data_parallel_size``) is used when ``parallel.distributed_optimizer`` is "on", or "auto" on CUDA
    with more than one such rank. On CPU/gloo
    it trains correctly ("on"; tests/test_normalization.py, tests/test_trainer.py), but megatron-core
    0.19's checkpoint of it without Apex/TE (torch's Adam) does not resume exactly, so "auto" leaves
    it off there. With fp16
    parameters the optimizer's dynamic loss scaler is connected to the pipeline schedule
    (``grad_scale_func``), so the loss is scaled before backward and the gradients unscaled after.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    choice = cfg.parallel.distributed_optimizer
    use_distributed = choice == "on" or (choice == "auto" and on_cuda and data_parallel_size > 1)
    transformer_config = student.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed,
        check_for_nan_in_grad=False,  # the trainer checks the loss and applies nan_policy itself
    )
    model = DistributedDataParallel(transformer_config, ddp_config, student)
    transformer_config.finalize_model_grads_func = finalize_model_grads
    dtype = student.opd_config.torch_dtype
    optim = cfg.optim
    optimizer_config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=use_distributed,
        loss_scale=optim.loss_scale,
        initial_loss_scale=optim.initial_loss_scale,
        loss_scale_window=optim.loss_scale_window,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    if dtype == torch.float16:
        # megatron's schedule multiplies the loss by grad_scale_func before backward; without it the
        # fp16 optimizer would divide unscaled gradients by the loss scale
        transformer_config.grad_scale_func = optimizer.scale_loss
    return model, optimizer, use_distributed


# ------------------------------------------------------------------------------- run directory
def claim_run_directories(cfg: TrainConfig, is_rank0: bool) -> List[RunDirectoryLock]:
    """Before anything is built: the run and checkpoint directories must be writable and apart from the
    model checkpoints the run reads (``keep_last`` would delete a checkpoint inside its save directory),
    and no other run may be writing them (rank 0 locks them; every rank raises the same error)."""
    locks: List[RunDirectoryLock] = []
    problem = None
    if is_rank0:
        inputs = [("model.student_checkpoint", cfg.model.student_checkpoint),
                  ("model.teacher_checkpoint", cfg.model.teacher_checkpoint)]
        try:
            check_output(cfg.run_dir, "run_dir", "dir")
            check_output(cfg.checkpoint_dir, "checkpoint.save_dir", "dir", inputs)
            locks.append(RunDirectoryLock(cfg.run_dir, "run_dir").acquire())
            if not os.path.realpath(cfg.checkpoint_dir).startswith(os.path.realpath(cfg.run_dir) + os.sep):
                locks.append(RunDirectoryLock(cfg.checkpoint_dir, "checkpoint.save_dir").acquire())
        except (ValueError, OSError) as error:
            for lock in locks:
                lock.release(remove_if_unused=True)
            locks, problem = [], error_message(error)
    problem = broadcast_object(problem)
    if problem is not None:
        raise ValueError(problem)
    return locks


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    """Owns the student (DDP-wrapped), the frozen teacher, optimizer, schedules, data and logging.

    ``runtime`` comes from ``platform.initialize_runtime`` with the config's TP/PP sizes.
    ``rollout_fn`` replaces the rollout engine (tests use a naive reference decoder); ``samples``
    replaces the configured data source.
    """

    def __init__(self, cfg: TrainConfig, runtime, rollout_fn: Optional[RolloutFn] = None,
                 samples: Optional[Sequence[Sample]] = None) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.objective = get_objective(cfg.objective)
        self.rollout_fn = rollout_fn or engine_rollout
        self.rank = dist.get_rank()
        self.locks = claim_run_directories(cfg, self.rank == 0)
        try:
            self._setup(cfg, runtime, samples)
        except BaseException:
            self._release_locks(failed=True)  # a refused run leaves nothing behind
            raise
        attach_log_file(os.path.join(cfg.run_dir, "logs", f"rank{self.rank}.log"))

    def _setup(self, cfg: TrainConfig, runtime, samples: Optional[Sequence[Sample]]) -> None:
        from megatron.core import parallel_state

        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
        if batch % (self.dp_size * micro):
            raise ValueError(
                f"train.global_batch_size {batch} must be a multiple of data-parallel size {self.dp_size} x "
                f"train.micro_batch_size {micro}"
            )

        self.student, self.config, self.teacher = self._build_models()
        if samples is None:
            samples = load_run_samples(cfg, self.config)
        else:
            check_token_ids(samples, self.config.vocab_size, self.config.mask_token_id)
        self.skipped_long_prompts = getattr(samples, "skipped_long_prompts", 0)
        self.timers = PhaseTimers()
        self.data = StepData(cfg, self.objective, self.student, self.config, self.teacher, samples,
                             self.rollout_fn, self.rank, self.timers)
        resume_from = self._resume_directory() if cfg.checkpoint.resume else None
        # quantization-aware training: before the optimizer copies the weights; a resumed run's checkpoint
        # brings the ranges, so only a fresh run calibrates
        quantize_student(cfg, self.student, self.config, samples, calibrate=resume_from is None)
        # megatron shards the distributed optimizer over data x context parallel ranks (their gradients agree)
        self.model, self.optimizer, self.distributed_optimizer = wrap_and_build_optimizer(
            self.student, cfg, self.dp_size * parallel_state.get_context_parallel_world_size(), not runtime.is_cpu)
        self.divergence = cfg.loss.divergence_config()
        self.router_stats = RouterStatistics.for_student(self.student, self.config, cfg.moe)  # None: dense
        self.total_steps = cfg.train.steps or self.steps_for_epochs(len(samples))
        self.lr_schedule = LRSchedule(self.optimizer, cfg.optim, self.total_steps)
        # FLOPs (eq. 7) run through the active parameters (a mixture of experts: top-k experts per token)
        self.student_parameters = self.config.num_parameters(active=True)
        self.teacher_parameters = self.teacher.config.num_parameters(active=True) if self.objective.distill else 0

        self.step = 0
        self.counters = {"tokens_trained": 0.0, "paper_tokens_total": 0.0, "answer_tokens_total": 0.0,
                         "flops_total": 0.0}
        self.spikes = LossSpikeDetector(cfg.train.loss_spike_factor, cfg.train.loss_spike_window)
        self.metrics = MetricsLogger(cfg.run_dir, cfg.logging, cfg.to_dict(), is_writer=self.rank == 0)
        self.history: List[Dict[str, float]] = []
        self.stopped_by: Optional[str] = None  # the signal that ended fit() early
        if resume_from is not None:
            self.resume(resume_from)
        elif cfg.checkpoint.resume:
            self.metrics.drop_from(0)  # a run restarted before its first save redoes what it logged

    def steps_for_epochs(self, num_samples: int) -> int:
        """Optimizer steps of ``data.epochs`` passes over ``num_samples`` samples (whole rollouts)."""
        rollouts = max(1, math.ceil(self.cfg.data.epochs * num_samples / self.cfg.rollout.tasks_per_rollout))
        return rollouts * self.cfg.updates_per_rollout

    # ----------------------------------------------------------------------------- building
    def _build_models(self):
        """The student (its checkpoint's weights) and, when the objective needs one, the frozen teacher."""
        cfg, paths = self.cfg, self.cfg.model
        source = None if paths.random_init else paths.student_checkpoint
        config = ModelConfig.from_dict(dict(paths.model_config)) if paths.random_init else load_model_config(source)
        config = student_architecture(cfg, config, compute_device().type)
        student = build_student_model(cfg, config)
        if source is not None:
            load_model_checkpoint(student, source)
        teacher = build_teacher(cfg, self.objective, config, source, student) if self.objective.needs_teacher else None
        return student, config, teacher

    # ------------------------------------------------------------------------------- a step
    def train_step(self) -> Dict[str, float]:
        """Runs optimizer step ``self.step`` (starting a rollout when the last one is used up),
        advances ``self.step`` and returns the step's metrics (the same on every rank)."""
        cfg = self.cfg
        step = self.step
        inputs = self.data.prepare(step)
        batch, targets, buffer = inputs.batch, inputs.targets, inputs.buffer

        with self.timers.phase("student"):
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            out = student_step(self.model, self.config, batch, targets, self.divergence,
                               cfg.train.micro_batch_size, normalization=cfg.loss.normalization,
                               pack_states=cfg.loss.pack_states)
        loss = float(out["loss"])
        routing = self.router_stats.collect() if self.router_stats is not None else {}

        grad_norm = None
        with self.timers.phase("optimizer"):
            # fp16: megatron's loss scaler finds inf/NaN gradients itself, skips the step and lowers the scale;
            # intercepting them here would keep the scale where it overflows, skipping every later step
            finite = self._all_finite(loss, self.config.torch_dtype == torch.float16 or self._local_grads_finite())
            lr = self.lr_schedule.set_step(step)
            paper_tokens = self.data.paper_tokens(buffer)
            answer_tokens = self.data.answer_tokens(buffer)
            if finite:
                ok, grad_norm, _ = self.optimizer.step()
                trained = bool(ok)
            else:
                trained = False
                message = (f"step {step}: non-finite loss {loss!r}" if not math.isfinite(loss)
                           else f"step {step}: non-finite gradients (loss {loss!r})")
                if cfg.nan_policy == "stop":
                    raise NonFiniteLossError(message + " (nan_policy='stop')")
                if self.rank == 0:
                    logger.warning("%s; update skipped (nan_policy='skip')", message)
                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()
        metrics = step_record(inputs.metrics, loss, out["token_mean"], not trained, grad_norm, lr, paper_tokens,
                              self.skipped_long_prompts)
        metrics.update(routing)
        metrics["loss_spike"] = float(self.spikes.update(loss))
        if metrics["loss_spike"] and self.rank == 0:
            logger.warning("step %d: loss spike: %.4g is above %g x the median of the last (up to %d) losses", step,
                           loss, self.spikes.factor, self.spikes.window)
        flops = 2 * self.teacher_parameters * paper_tokens + 6 * self.student_parameters * paper_tokens
        if trained:  # skipped steps count no tokens
            self.counters["tokens_trained"] += out["num_tokens"]
            self.counters["paper_tokens_total"] += paper_tokens
            self.counters["answer_tokens_total"] += answer_tokens
            self.counters["flops_total"] += flops
        self.data.done_step()
        self.step = step + 1

        metrics.update(tokens=out["num_tokens"], flops=flops if trained else 0.0, epoch=self.data.stream.epochs_done,
                       **self.counters)
        if batch.distill:
            metrics[cfg.loss.divergence] = loss
            if cfg.loss.divergence == "forward_kl":
                metrics["kl"] = loss
        metrics.update(self.timers.reset())
        return metrics

    @staticmethod
    def _all_finite(loss: float, grads_finite: bool = True) -> bool:
        # every rank must take the same branch: agree over the whole world
        flag = torch.tensor([1.0 if math.isfinite(loss) and grads_finite else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _local_grads_finite(self) -> bool:
        """Whether this rank's reduced gradients are all finite. A finite loss can come with NaN/inf
        gradients (an overflow in backward); megatron's fp32/bf16 optimizer would apply them, so they
        are checked here, one pass over the gradient buffers, like the gradient norm."""
        buffers = [b.grad_data for b in getattr(self.model, "buffers", []) if getattr(b, "grad_data", None) is not None]
        if not buffers:
            buffers = [g for g in (getattr(p, "main_grad", None) for p in self.student.parameters()) if g is not None]
        return all(bool(torch.isfinite(g).all()) for g in buffers)

    # ------------------------------------------------------------------------------ the loop
    def fit(self, until_step: Optional[int] = None) -> List[Dict[str, float]]:
        """Trains from the current step to ``total_steps`` (or ``until_step``, to simulate an
        interruption); saves every ``checkpoint.save_every`` steps and at the end, and after the
        current step when a ``checkpoint.exit_signals`` signal arrives (then returns early)."""
        cfg = self.cfg
        last = min(self.total_steps, until_step) if until_step is not None else self.total_steps
        if self.step >= self.total_steps and self.rank == 0:
            logger.warning("nothing to train: the run in %s has done %d steps and this config asks for %d "
                           "(train.steps / data.epochs); raise them to continue", cfg.run_dir, self.step,
                           self.total_steps)
        bar = progress_bar(self.total_steps, self.step, cfg.logging.progress_bar and self.rank == 0)
        try:
            with ExitSignals(cfg.checkpoint.exit_signals) as signals:
                self._fit_loop(last, bar, signals)
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _fit_loop(self, last: int, bar, signals: ExitSignals) -> None:
        """``fit``'s steps: log, save when due, stop after the step a signal arrived in."""
        cfg = self.cfg
        while self.step < last:
            step = self.step
            metrics = self.train_step()
            self.history.append({"step": step, **metrics})
            if step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                self.metrics.log(metrics, step)
            if bar is not None:
                bar.set_postfix(compact(metrics), refresh=False)
                bar.update(1)
            every = cfg.checkpoint.save_every
            stop = self.step < last and signals.stop_requested()
            if (every and self.step % every == 0) or self.step == last or stop:
                self.save()
            if stop:
                self.stopped_by = signals.received or "a signal on another rank"
                if self.rank == 0:
                    logger.warning("stopping after step %d on %s: checkpoint saved, resume with the same config",
                                   self.step, self.stopped_by)
                break

    # ------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> Dict:
        buffer = self.data.buffer
        return {
            "format": 2,
            "step": self.step,
            "rollouts_started": self.data.rollouts_started,
            "data": self.data.stream.state_dict(),
            "scheduler": self.lr_schedule.state_dict(),
            "counters": dict(self.counters),
            "loss_spikes": self.spikes.state_dict(),
            "buffer": buffer.state() if self.data.mid_rollout else None,
            "objective": self.cfg.objective,
            "seed": self.cfg.seed,
        }

    def save(self) -> str:
        """Saves a resumable checkpoint (student + optimizer + trainer state, and the rollout buffer
        when a rollout's steps are not all taken yet; never the teacher)."""
        return save_training_checkpoint(self.cfg.checkpoint_dir, self.step, self.student, self.optimizer,
                                        self.config, self.trainer_state(), self.cfg.checkpoint.keep_last,
                                        rollout_buffer=self.data.buffer.answers if self.data.mid_rollout else None,
                                        tokenizer_dir=self.cfg.model.tokenizer_dir, run_config=self.cfg.to_dict())

    def _resume_directory(self) -> Optional[str]:
        """The checkpoint this run resumes from, None when there is none."""
        remove_stale_partials(self.cfg.checkpoint_dir)
        # rank 0 verifies the manifests (hashing every file once) and tells the others which to load
        return broadcast_object(latest_checkpoint(self.cfg.checkpoint_dir) if self.rank == 0 else None)

    def resume(self, directory: str) -> None:
        changes = resume_config_changes(directory, self.cfg.to_dict())
        if changes and self.rank == 0:
            logger.warning("resuming %s with changed settings: %s", directory, "; ".join(changes))
        state, buffer_answers = load_training_checkpoint(directory, self.student, self.optimizer, verified=True)
        if state["objective"] != self.cfg.objective or state["seed"] != self.cfg.seed:
            raise ValueError(
                f"{directory} was written by a run with objective={state['objective']!r} seed={state['seed']}, "
                f"this run has objective={self.cfg.objective!r} seed={self.cfg.seed}"
            )
        self.step = int(state["step"])
        self.data.stream.load_state_dict(state["data"])
        self.lr_schedule.load_state_dict(state["scheduler"])
        if state.get("format", 1) == 1:
            # the first layout: one rollout of prompts_per_step prompts per optimizer step
            self.data.rollouts_started = self.step
            self.counters["tokens_trained"] = float(state["tokens_trained"])
        else:
            self.data.rollouts_started = int(state["rollouts_started"])
            self.counters.update({k: float(v) for k, v in state["counters"].items()})
            self.spikes.load_state_dict(state.get("loss_spikes", {}))
            saved = state.get("buffer")
            if saved is not None:
                if buffer_answers is None:
                    raise ValueError(f"{directory} was saved inside a rollout but holds no rollout buffer")
                self.data.buffer = RolloutBuffer(int(saved["rollout"]), buffer_answers, int(saved["generation_length"]),
                                            int(saved["next_update"]), dict(saved["metrics"]))
        self.metrics.drop_from(self.step)
        logger.info("resumed from %s at step %d", directory, self.step)

    def close(self) -> None:
        if self.router_stats is not None:
            self.router_stats.close()
        self.metrics.close()
        self._release_locks()

    def _release_locks(self, failed: bool = False) -> None:
        for lock in self.locks:
            lock.release(remove_if_unused=failed)
        self.locks = []
