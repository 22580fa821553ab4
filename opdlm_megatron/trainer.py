"""The OPD training loop (paper, Algorithm 1) and its baselines, on megatron-core.

One step, top to bottom (``Trainer.train_step``):

1. **rollout** (no grad): this data-parallel rank's prompts are decoded by the student's block
   diffusion engine with the curriculum's maximum length ``L_s`` (``opd``/``opd_off``); the teacher
   answers them autoregressively (``sft``); or the dataset's responses are taken as they are
   (``mdlm``).
2. **states**: the supervised state ``xt`` of every answer: a state of the student's own trajectory
   (``opd``), a random masking of its final answer (``opd_off``) or the forward masking process
   with its ``1/t`` weight (``mdlm``, ``sft``).
3. **teacher** (``opd``/``opd_off``): one causal forward of the frozen ARLM over ``[prompt; x0]``
   gives the target distribution of every answer token (vocab-parallel, last pipeline stage).
4. **student**: forward/backward of the student on ``[prompt | x0 | xt]`` over microbatches through
   megatron-core's ``get_forward_backward_func`` (pipeline schedules included); gradients land in
   megatron DDP's buffers and ``finalize_model_grads`` reduces them (data parallel, tied embeddings).
5. **optimizer**: a non-finite loss is reported and the update skipped (or the run stopped);
   otherwise the learning rate is set for this step and megatron's optimizer clips and steps.

Randomness of step ``s`` (rollout sampling seed, state selection) derives from ``(seed, s, data
parallel rank)`` only, so every tensor/pipeline layout and a resumed run make the same choices.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses, states
from .checkpointing import load_model_checkpoint, load_model_config
from .config import ModelConfig, canonical_dtype
from .data import Sample, SampleStream, load_samples, load_tokenizer
from .metrics import MetricsLogger, PhaseTimers, compact, progress_bar
from .model import build_model
from .rollout.config import DecodeConfig
from .rollout.types import RolloutResult
from .schedules import LRSchedule, rollout_length, whole_blocks
from .student import student_forward_backward
from .teacher import FrozenTeacher
from .train_checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

# rollout_fn(model, config, prompts, decode) -> RolloutResult; the default is the KV-cached engine
RolloutFn = Callable[[torch.nn.Module, ModelConfig, List[List[int]], DecodeConfig], RolloutResult]


class NonFiniteLossError(RuntimeError):
    """Raised with ``nan_policy="stop"`` when a step's loss is NaN or infinite."""


def engine_rollout(model, config: ModelConfig, prompts: List[List[int]], decode: DecodeConfig) -> RolloutResult:
    """Decodes ``prompts`` with the block-diffusion rollout engine (KV cache, TP/PP aware)."""
    from .rollout.engine import DiffusionRolloutEngine

    return DiffusionRolloutEngine(model, config).generate(prompts, decode)


def _mix_seed(*parts: int) -> int:
    """A 31-bit seed from integers (deterministic, layout independent)."""
    value = 0x9E3779B1
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x7F4A7C15) % (2**61 - 1)
    return value % (2**31 - 1)


# --------------------------------------------------------------------------- model + optimizer
def wrap_and_build_optimizer(student, cfg: TrainConfig, data_parallel_size: int, on_cuda: bool):
    """Wraps the student in megatron DDP and builds megatron's AdamW optimizer for it.

    The distributed optimizer (optimizer state sharded over data-parallel ranks) is used when
    ``parallel.distributed_optimizer`` is "on", or "auto" on CUDA with data parallelism; "auto"
    leaves it off on CPU, where its reduce-scatter/all-gather paths are untested on gloo.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    choice = cfg.parallel.distributed_optimizer
    use_distributed = choice == "on" or (choice == "auto" and on_cuda and data_parallel_size > 1)
    if choice == "auto" and not use_distributed:
        reason = "no data parallelism" if data_parallel_size == 1 else "CPU/gloo run"
        logger.info("distributed optimizer off (%s)", reason)
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
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    return model, optimizer, use_distributed


def _data_parallel_mean(values: Dict[str, float], sums: Sequence[str] = ()) -> Dict[str, float]:
    """Averages (or, for keys in ``sums``, adds) per-replica numbers over data-parallel ranks."""
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return values
    keys = sorted(values)
    box = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(box, group=parallel_state.get_data_parallel_group())
    return {k: float(v) if k in sums else float(v) / size for k, v in zip(keys, box.tolist())}


def samples_to_result(samples: Sequence[Sample], pad_token_id: int) -> RolloutResult:
    """Dataset (prompt, response) pairs in the rollout layout (left-padded prompts, right-padded
    answers), for the off-policy baselines; there is no trajectory (``commit_step`` -1)."""
    if any(s.response_ids is None or not s.response_ids for s in samples):
        raise ValueError("the mdlm objective needs samples with non-empty responses")
    bsz = len(samples)
    plen = max(len(s.prompt_ids) for s in samples)
    alen = max(len(s.response_ids) for s in samples)
    prompt_ids = torch.full((bsz, plen), pad_token_id, dtype=torch.long)
    prompt_valid = torch.zeros((bsz, plen), dtype=torch.bool)
    answer_ids = torch.full((bsz, alen), pad_token_id, dtype=torch.long)
    answer_valid = torch.zeros((bsz, alen), dtype=torch.bool)
    for i, s in enumerate(samples):
        p, a = len(s.prompt_ids), len(s.response_ids)
        prompt_ids[i, plen - p:] = torch.tensor(s.prompt_ids)
        prompt_valid[i, plen - p:] = True
        answer_ids[i, :a] = torch.tensor(s.response_ids)
        answer_valid[i, :a] = True
    return RolloutResult(
        prompt_ids=prompt_ids, prompt_valid=prompt_valid, answer_ids=answer_ids, answer_valid=answer_valid,
        commit_step=torch.full_like(answer_ids, -1), num_rounds=torch.zeros(bsz, dtype=torch.long),
        finished=torch.ones(bsz, dtype=torch.bool), num_forward_passes=0,
    )


@dataclass
class StepBatch:
    """What the student step consumes."""

    result: RolloutResult
    xt: Tensor
    targets: Optional[Tensor]  # teacher logits (last stage) or token ids
    objective: str  # student_forward_backward objective: "distill" | "ce"
    loss_weights: Optional[Tensor] = None


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    """Owns the student (DDP-wrapped), the frozen teacher, optimizer, schedules, data and logging.

    ``runtime`` comes from ``platform.initialize_runtime`` with the config's TP/PP sizes.
    ``rollout_fn`` replaces the rollout engine (tests use a naive reference decoder).
    """

    def __init__(self, cfg: TrainConfig, runtime, rollout_fn: Optional[RolloutFn] = None,
                 samples: Optional[Sequence[Sample]] = None) -> None:
        from megatron.core import parallel_state

        self.cfg = cfg
        self.runtime = runtime
        self.rollout_fn = rollout_fn or engine_rollout
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        if cfg.prompts_per_step % (self.dp_size * cfg.micro_batch_size):
            raise ValueError(
                f"prompts_per_step {cfg.prompts_per_step} must be a multiple of data-parallel size "
                f"{self.dp_size} x micro_batch_size {cfg.micro_batch_size}"
            )
        self.rows_per_rank = cfg.prompts_per_step // self.dp_size

        self.student, self.config, teacher_model, teacher_config = self._build_models()
        self.teacher = None
        if teacher_model is not None:
            self.teacher = FrozenTeacher(teacher_model, teacher_config, self.config)
        self.model, self.optimizer, self.distributed_optimizer = wrap_and_build_optimizer(
            self.student, cfg, self.dp_size, not runtime.is_cpu)
        self.lr_schedule = LRSchedule(self.optimizer, cfg.optim, cfg.steps)
        self.divergence = losses.DivergenceConfig(
            kind=cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta, top_k=cfg.loss.top_k,
            renormalize_top_k=cfg.loss.renormalize_top_k, chunk_tokens=cfg.loss.chunk_tokens,
        )
        self.end_of_turn_ids = list(cfg.loss.end_of_turn_ids if cfg.loss.end_of_turn_ids is not None
                                    else self.config.eos_token_ids)

        if samples is None:
            tokenizer = None
            if cfg.data.source != "token_ids":
                tokenizer = load_tokenizer(cfg.model.tokenizer or os.path.join(cfg.model.student_checkpoint, "tokenizer"))
            eos = self.config.eos_token_ids[0] if self.config.eos_token_ids else None
            samples = load_samples(cfg.data, tokenizer, eos)
        self.stream = SampleStream(samples, cfg.data.seed, cfg.data.shuffle)

        self.step = 0
        self.tokens_trained = 0.0
        self.timers = PhaseTimers()
        self.metrics = MetricsLogger(cfg.run_dir, cfg.logging, cfg.to_dict(), is_writer=self.rank == 0)
        self.history: List[Dict[str, float]] = []
        if cfg.checkpoint.resume:
            self.maybe_resume()

    # ----------------------------------------------------------------------------- building
    def _build_models(self):
        cfg = self.cfg
        paths = cfg.model
        needs_teacher = cfg.objective in ("opd", "opd_off", "sft")
        if paths.random_init:
            config = ModelConfig.from_dict(dict(paths.model_config))
        else:
            config = load_model_config(paths.student_checkpoint)
        if cfg.block_size is not None:
            config = config.replace(block_size=cfg.block_size)
        student = build_model(config, "student")
        if not paths.random_init:
            load_model_checkpoint(student, paths.student_checkpoint)
        if not needs_teacher:
            return student, config, None, None
        teacher_dtype = canonical_dtype(paths.teacher_dtype) if paths.teacher_dtype else None
        if paths.teacher_checkpoint:
            teacher_config = load_model_config(paths.teacher_checkpoint)
            teacher_config = teacher_config.replace(
                params_dtype=teacher_dtype or teacher_config.params_dtype)
            teacher = build_model(teacher_config, "teacher")
            load_model_checkpoint(teacher, paths.teacher_checkpoint)
        else:
            # self-distillation: the teacher is the student's initial weights
            teacher_config = config.replace(params_dtype=teacher_dtype or config.params_dtype)
            teacher = build_model(teacher_config, "teacher")
            teacher.load_state_dict(student.state_dict(), strict=False)
            teacher.to(dtype=teacher_config.torch_dtype)
        return student, config, teacher, teacher_config

    # ------------------------------------------------------------------------------- a step
    def _step_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix_seed(self.cfg.seed, step, self.dp_rank, 1))

    def _decode_config(self, step: int, max_new_tokens: int, teacher: bool) -> DecodeConfig:
        r = self.cfg.rollout
        seed = _mix_seed(self.cfg.seed, step, self.dp_rank, 2)
        if teacher:  # autoregressive: one token per block
            return DecodeConfig(max_new_tokens=max_new_tokens, block_size=1, threshold=1.0,
                                temperature=r.teacher_temperature, seed=seed,
                                eos_token_ids=self.end_of_turn_ids or None)
        return DecodeConfig(max_new_tokens=max_new_tokens, threshold=r.threshold, temperature=r.temperature,
                            top_k=r.top_k, top_p=r.top_p, tokens_per_step=r.tokens_per_step, seed=seed,
                            eos_token_ids=self.end_of_turn_ids or None)

    def _rollout_length(self, step: int, prompts: Sequence[Sample]) -> int:
        longest_prompt = max(len(s.prompt_ids) for s in prompts)
        room = self.config.max_sequence_length - longest_prompt
        if room < 1:
            raise ValueError(f"a prompt of {longest_prompt} tokens leaves no room for an answer within "
                             f"max_sequence_length {self.config.max_sequence_length}")
        length = max(1, min(rollout_length(step, self.cfg.curriculum), room))
        # the student decodes whole blocks; the teacher (sft) decodes token by token
        return whole_blocks(length, 1 if self.cfg.objective == "sft" else self.config.block_size)

    def _rollout(self, step: int, samples: Sequence[Sample]) -> StepBatch:
        cfg = self.cfg
        mask_id = self.config.mask_token_id
        generator = self._step_generator(step)
        prompts = [list(s.prompt_ids) for s in samples]
        if cfg.objective == "mdlm":
            result = samples_to_result(samples, self.config.pad_token_id or 0)
        elif cfg.objective == "sft":
            # the teacher answers autoregressively: block size 1 with the AR logit shift
            teacher_ar = self.teacher.config.replace(block_size=1, logit_shift=True)
            decode = self._decode_config(step, self._rollout_length(step, samples), teacher=True)
            with torch.no_grad():
                result = self.rollout_fn(self.teacher.model, teacher_ar, prompts, decode)
        else:
            decode = self._decode_config(step, self._rollout_length(step, samples), teacher=False)
            self.student.eval()
            try:
                with torch.no_grad():
                    result = self.rollout_fn(self.student, self.config, prompts, decode)
            finally:
                self.student.train()
        if cfg.objective == "opd":
            xt = states.select_states(result, cfg.loss.state_selection, generator, mask_id,
                                      block_size=self.config.block_size)
            return StepBatch(result, xt, None, "distill")
        if cfg.objective == "opd_off":
            xt = states.random_mask_states(result, generator, mask_id, block_size=self.config.block_size)
            return StepBatch(result, xt, None, "distill")
        xt, t = states.forward_mask(result.answer_ids, result.answer_valid, self.config.block_size, generator, mask_id)
        weights = torch.where(result.answer_valid, 1.0 / t.clamp_min(1e-6), torch.zeros_like(t))
        return StepBatch(result, xt, result.answer_ids, "ce", weights)

    def _teacher_targets(self, batch: StepBatch) -> Dict[str, float]:
        """Teacher logits for the answers (into ``batch.targets``) and the teacher NLL metric."""
        r = batch.result
        logits = self.teacher.answer_logits(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid,
                                            self.cfg.micro_batch_size)
        batch.targets = logits
        # from the logits just computed (last stage), broadcast to every stage
        per_token = self.teacher.answer_nll(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid,
                                            self.cfg.micro_batch_size, logits=logits,
                                            chunk_tokens=self.cfg.loss.chunk_tokens)
        mask = losses.answer_loss_mask(r.answer_ids, r.answer_valid, self.end_of_turn_ids,
                                       self.cfg.loss.include_end_of_turn)
        return {"teacher_nll": float(losses.row_mean(per_token, mask)) if mask.any() else 0.0}

    def train_step(self, step: int) -> Dict[str, float]:
        """Runs training step ``step`` (0-based) and returns its metrics (same on every rank)."""
        cfg = self.cfg
        samples = self.stream.next_batch(cfg.prompts_per_step)
        samples = samples[self.dp_rank * self.rows_per_rank:(self.dp_rank + 1) * self.rows_per_rank]
        metrics: Dict[str, float] = {}

        with self.timers.phase("rollout"):
            batch = self._rollout(step, samples)
        r = batch.result
        lengths = r.answer_valid.sum(-1).double()
        local = {
            "answer_tokens": float(lengths.mean()),
            "committed_per_forward": float((lengths / r.num_rounds.clamp_min(1).double()).mean())
            if cfg.objective in ("opd", "opd_off") else float("nan"),
            "forward_passes": float(r.num_forward_passes),
            "finished_fraction": float(r.finished.double().mean()),
        }

        if batch.objective == "distill":
            with self.timers.phase("teacher"):
                local.update(self._teacher_targets(batch))

        with self.timers.phase("student"):
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            out = student_forward_backward(
                self.model, self.config, r, batch.xt, batch.targets, batch.objective, self.divergence,
                cfg.micro_batch_size, loss_weights=batch.loss_weights,
                end_of_turn_ids=self.end_of_turn_ids, include_end_of_turn=cfg.loss.include_end_of_turn,
            )
        loss = float(out["loss"])
        local["loss"] = loss
        local = _data_parallel_mean(local)
        num_tokens = _data_parallel_mean({"n": float(out["num_tokens"])}, sums=("n",))["n"]
        metrics.update(local)

        with self.timers.phase("optimizer"):
            finite = self._all_finite(loss)
            lr = self.lr_schedule.set_step(step)
            if finite:
                ok, grad_norm, _ = self.optimizer.step()
                metrics["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
                metrics["skipped"] = 0.0 if ok else 1.0
                self.tokens_trained += num_tokens
            else:
                metrics["skipped"] = 1.0
                message = f"step {step}: non-finite loss {loss!r}"
                if cfg.nan_policy == "stop":
                    raise NonFiniteLossError(message + " (nan_policy='stop')")
                logger.warning("%s; update skipped (nan_policy='skip')", message)
                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()

        metrics.update(lr=lr, rollout_len=float(self._rollout_length(step, samples))
                       if cfg.objective != "mdlm" else float("nan"),
                       tokens=num_tokens, tokens_trained=self.tokens_trained)
        if batch.objective == "distill":
            metrics[cfg.loss.divergence] = loss
            if cfg.loss.divergence == "forward_kl":
                metrics["kl"] = loss
        metrics.update(self.timers.reset())
        return metrics

    @staticmethod
    def _all_finite(loss: float) -> bool:
        # every rank must take the same branch: agree over the whole world
        flag = torch.tensor([1.0 if math.isfinite(loss) else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    # ------------------------------------------------------------------------------ the loop
    def fit(self, until_step: Optional[int] = None) -> List[Dict[str, float]]:
        """Trains from the current step to ``cfg.steps`` (or ``until_step``, to simulate an
        interruption); saves every ``checkpoint.save_every`` steps and at the end."""
        cfg = self.cfg
        last = min(cfg.steps, until_step) if until_step is not None else cfg.steps
        bar = progress_bar(cfg.steps, self.step, cfg.logging.progress_bar and self.rank == 0)
        try:
            while self.step < last:
                step = self.step
                metrics = self.train_step(step)
                self.step = step + 1
                self.history.append({"step": step, **metrics})
                if step % cfg.logging.log_every == 0 or self.step == cfg.steps:
                    self.metrics.log(metrics, step)
                if bar is not None:
                    bar.set_postfix(compact(metrics), refresh=False)
                    bar.update(1)
                every = cfg.checkpoint.save_every
                if (every and self.step % every == 0) or self.step == last:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        return self.history

    # ------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> Dict:
        return {
            "step": self.step,
            "data": self.stream.state_dict(),
            "scheduler": self.lr_schedule.state_dict(),
            "rollout_length": rollout_length(self.step, self.cfg.curriculum),
            "tokens_trained": self.tokens_trained,
            "objective": self.cfg.objective,
            "seed": self.cfg.seed,
        }

    def save(self) -> str:
        """Saves a resumable checkpoint (student + optimizer + trainer state; never the teacher)."""
        return save_training_checkpoint(self.cfg.checkpoint_dir, self.step, self.student, self.optimizer,
                                        self.config, self.trainer_state(), self.cfg.checkpoint.keep_last)

    def maybe_resume(self) -> bool:
        directory = latest_checkpoint(self.cfg.checkpoint_dir)
        if directory is None:
            return False
        state = load_training_checkpoint(directory, self.student, self.optimizer)
        if state["objective"] != self.cfg.objective or state["seed"] != self.cfg.seed:
            raise ValueError(
                f"{directory} was written by a run with objective={state['objective']!r} seed={state['seed']}, "
                f"this run has objective={self.cfg.objective!r} seed={self.cfg.seed}"
            )
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.lr_schedule.load_state_dict(state["scheduler"])
        self.tokens_trained = float(state["tokens_trained"])
        logger.info("resumed from %s at step %d", directory, self.step)
        return True

    def close(self) -> None:
        self.metrics.close()
