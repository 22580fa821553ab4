"""OPD inside Megatron-LM's ``pretrain()``: the model provider, the data, the forward step, and the
one place a rollout can run.

Where the rollout goes: ``pretrain()`` has no pre-step hook, and the rollout (a collective over every
rank) cannot run inside ``forward_step``: with PP > 1 the stages of the 1F1B schedule are at
different micro-batches (stage 1 waits for stage 0's activations while stage 0 would wait for stage 1
to join the rollout). So ``OPDPlugin.installed()`` wraps ``megatron.training.training.train_step`` for
the duration of ``pretrain()`` (the attribute ``train()`` looks up on each iteration; nothing in
Megatron's files changes): before Megatron's own ``train_step`` runs, every rank takes the step's
inputs from ``StepData`` (rollout when due -> states -> teacher targets) and queues the micro-batches
of a ``StudentStepPlan``; Megatron's ``forward_backward_func`` then pulls them through the data
iterator ``pretrain()`` built from ``datasets_provider`` (``--dataloader-type external``). The same
precedent exists upstream: Megatron-LM's RL path (``--perform-rl-step``) also produces its batches in
the training loop, right before ``train_step``.

Loss reporting follows Megatron-LM: ``opd loss`` and ``opd per-token loss`` are ``[sum, count]`` pairs
(summed over micro-batches and data-parallel ranks by ``train_step``), so the logged value is the
step's loss; the rollout's numbers (tokens per forward, rollout length, teacher NLL) join the loss
dict and so reach the console, TensorBoard and W&B like Megatron's own losses.

Weights: the student starts from ``--pretrained-checkpoint`` when given (Megatron-LM loads it), else
from ``--opd-student``'s own weights (either layout); ``--load`` resumes over them. The teacher is
``--opd-teacher``, else those starting weights read again (so a resumed run keeps its teacher).

Resuming (``--load``): rollouts are deterministic given the weights, the seed and the rollout index,
so a run saved at a rollout boundary (``--save-interval`` a multiple of ``tasks_per_rollout /
global_batch_size``) resumes exactly; one saved inside a rollout re-rolls that rollout with the saved
weights (warned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
from typing import Optional

import torch

from ...checkpoint.megatron_lm import has_model_config, is_megatron_lm_root, load_megatron_lm_model
from ...checkpoint.model import load_model_checkpoint, load_model_config
from ...config.model import ModelConfig
from ...data.samples import SampleList
from ...distill.answers import engine_rollout
from ...distill.teacher import FrozenTeacher
from ...model.quantization import quantization_exclude_of, quantization_of
from ...objectives import get_objective
from ...training.build import build_student_model, build_teacher, load_run_samples, quantize_student, step_record
from ...training.config import TrainConfig
from ...training.metrics import MetricsLogger
from ...training.router_stats import RouterStatistics
from ...training.step_data import StepData
from ...training.student import StudentStepPlan, forward_step

logger = logging.getLogger(__name__)


def optimizer_lr(rest) -> float:
    """The learning rate of the step just taken (``rest`` = train_step's arguments after ``model``)."""
    optimizer = rest[0] if rest else None
    groups = getattr(optimizer, "param_groups", None) or []
    return groups[0]["lr"] if groups else float("nan")


class MicrobatchQueue:
    """The 'dataset' ``pretrain()`` iterates (``--dataloader-type external``): the current step's
    micro-batches, queued by the train-step wrapper."""

    def __init__(self) -> None:
        self._items: list = []

    def load(self, items) -> None:
        if self._items:
            raise RuntimeError(f"{len(self._items)} micro-batches of the previous step were not consumed")
        self._items = list(items)

    def __iter__(self):
        return self

    def __next__(self):
        if not self._items:
            raise RuntimeError("the schedule asked for more micro-batches than the OPD step planned")
        return self._items.pop(0)


class OPDPlugin:
    """Everything ``pretrain()`` needs for an OPD run: ``model_provider``, ``datasets_provider``,
    ``forward_step`` and the ``train_step`` wrapper (``installed()``)."""

    def __init__(self, cfg: TrainConfig, student_config: ModelConfig) -> None:
        self.cfg = cfg
        self.config = student_config
        self.objective = get_objective(cfg.objective)
        self.queue = MicrobatchQueue()
        self.divergence = cfg.loss.divergence_config()
        self.skipped_long_prompts = 0
        self.data: Optional[StepData] = None
        self.metrics: Optional[MetricsLogger] = None
        self.student = None
        self.samples: Optional[SampleList] = None  # _run_samples()
        self.router_stats = None
        self.forward_step = forward_step

    # ---------------------------------------------------------------------- pretrain() hooks
    def model_provider(self, pre_process: bool = True, post_process: bool = True, vp_stage=None, config=None,
                       pg_collection=None, **_unused):
        """The student, built by ``training.build.build_student_model`` (the project's own trainer builds the same).
        ``variable_seq_lengths``: OPD sequences ([prompt | x0 | xt]) change length every step, so the
        pipeline exchanges shapes instead of assuming ``--seq-length``."""
        from megatron.training import get_args

        if vp_stage not in (None, 0):
            raise ValueError("virtual pipeline stages are not supported by OPD")
        # (megatron's config check ties variable lengths to the all-to-all MoE dispatcher, MoE or not)
        model = build_student_model(self.cfg, self.config, pre_process=pre_process, post_process=post_process,
                                    variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
        if not get_args().pretrained_checkpoint:
            # the starting weights are --opd-student's (pretrain() then loads --load over them when
            # resuming); with --pretrained-checkpoint, pretrain() loads that instead, as usual
            self._load_weights(model, self.cfg.model.student_checkpoint)
        elif self.cfg.quantization.format is not None:
            raise ValueError("quantization.format calibrates the starting weights before pretrain() loads "
                             "--pretrained-checkpoint: pass those weights as --opd-student instead")
        # quantization-aware training, as the project's trainer does it (before the optimizer); a resumed
        # run calibrates too, and --load then replaces the ranges with the saved ones
        quantize_student(self.cfg, model, self.config,
                         self._run_samples() if self.cfg.quantization.format is not None else [])
        return model

    def _run_samples(self) -> SampleList:
        """The run's samples, loaded once: model_provider needs them first when it calibrates, _setup always."""
        if self.samples is None:
            self.samples = load_run_samples(self.cfg, self.config)
        return self.samples

    def datasets_provider(self, _num_samples=None, vp_stage=None):
        return self.queue, None, None

    # ------------------------------------------------------------------------- the step
    def _setup(self, model, iteration: int) -> None:
        from megatron.core.utils import unwrap_model
        from megatron.training import get_args

        args = get_args()
        student = unwrap_model(model[0])
        self.student = student
        # tokens per expert (Megatron-LM's training_log reports the router losses itself)
        self.router_stats = RouterStatistics.for_student(student, self.config, self.cfg.moe)
        if args.save:
            self._describe_save_dir(args.save)
        teacher = None
        if self.objective.needs_teacher:
            teacher = self._build_teacher(args)
        samples = self._run_samples()
        self.skipped_long_prompts = samples.skipped_long_prompts
        rank = torch.distributed.get_rank()
        # one writer: the first tensor-, context- and data-parallel rank of the last pipeline stage (it holds the loss)
        from megatron.core import parallel_state

        writer = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.get_context_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0)
        logging_cfg = self.cfg.logging
        if logging_cfg.tensorboard:
            # Megatron-LM's own writer (--tensorboard-dir) already gets the OPD numbers through the loss dict
            if writer:
                logger.warning("logging.tensorboard is ignored under Megatron-LM: pass --tensorboard-dir, where "
                               "the OPD metrics appear as 'opd loss', 'opd rollout len' ...")
            logging_cfg = dataclasses.replace(logging_cfg, tensorboard=False)
        self.metrics = MetricsLogger(self.cfg.run_dir, logging_cfg, self.cfg.to_dict(), is_writer=writer)
        self.metrics.drop_from(iteration)
        self.data = StepData(self.cfg, self.objective, student, self.config, teacher, samples, engine_rollout, rank)
        if iteration:
            if iteration % self.cfg.updates_per_rollout:
                logger.warning("resumed at iteration %d, inside a rollout (%d steps per rollout): it is re-run with "
                               "the saved weights, so this run leaves the uninterrupted one; save at multiples of %d "
                               "steps to resume exactly", iteration, self.cfg.updates_per_rollout,
                               self.cfg.updates_per_rollout)
            self.data.fast_forward(iteration)

    def _build_teacher(self, args) -> FrozenTeacher:
        """``--opd-teacher``, else the student's starting weights (self-distillation), read again from
        where they came from (``--pretrained-checkpoint``, else ``--opd-student``), so a resumed run
        has the same teacher as the run it continues (``training.build.build_teacher``)."""
        source = args.pretrained_checkpoint or self.cfg.model.student_checkpoint
        return build_teacher(self.cfg, self.objective, self.config, source, load=self._load_weights,
                             config_of=lambda path: load_model_config(path) if has_model_config(path) else self.config,
                             names=("--opd-teacher", "--pretrained-checkpoint" if args.pretrained_checkpoint
                                    else "--opd-student", "pass the AR model as --opd-teacher"))

    @staticmethod
    def _load_weights(model, path: str) -> None:
        if is_megatron_lm_root(path) and not has_model_config(path):
            load_megatron_lm_model(model, path)  # a plain Megatron-LM checkpoint (the architecture was checked)
        else:
            load_model_checkpoint(model, path)

    def _describe_save_dir(self, save: str) -> None:
        """Puts the student config and tokenizer into ``--save`` (rank 0), so the run's checkpoints
        are complete for ``--opd-student``, evaluation and the HF export."""
        if torch.distributed.get_rank() != 0:
            return
        from megatron.core import parallel_state

        os.makedirs(save, exist_ok=True)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.config.replace(padded_vocab=self.config.padded_vocab_size(tp), quantization=quantization_of(self.student),
                            quantization_exclude=quantization_exclude_of(self.student)).save(save)
        tokenizer = self.cfg.model.tokenizer_dir
        target = os.path.join(save, "tokenizer")
        if tokenizer and os.path.isdir(tokenizer) and not os.path.isdir(target):
            shutil.copytree(tokenizer, target)

    def train_step(self, original, forward_step_func, data_iterator, model, *rest, iteration=None, **kwargs):
        """Megatron's ``train_step`` with the step's OPD inputs queued first."""
        from megatron.core.num_microbatches_calculator import get_num_microbatches
        from megatron.training import get_args

        step = int(iteration or 0)
        if self.data is None:
            self._setup(model, step)
        inputs = self.data.prepare(step)
        args = get_args()
        plan = StudentStepPlan(model[0], self.config, inputs.batch, inputs.targets, self.divergence,
                               args.micro_batch_size, self.cfg.loss.normalization,
                               pack_states=self.cfg.loss.pack_states)
        plan.megatron_lm_logging = True
        if plan.num_microbatches != get_num_microbatches():
            raise RuntimeError(f"OPD planned {plan.num_microbatches} micro-batches, Megatron-LM runs "
                               f"{get_num_microbatches()}")
        self.queue.load(plan.microbatches)
        paper_tokens = self.data.paper_tokens(inputs.buffer)
        result = original(forward_step_func, data_iterator, model, *rest, iteration=iteration, **kwargs)
        self.data.done_step()
        loss_dict, skipped, grad_norm = result[0], result[1], result[5]
        routing = self.router_stats.collect(read_router_losses=False) if self.router_stats is not None else {}
        if loss_dict:  # the last pipeline stage logs
            record = step_record(inputs.metrics, loss_dict["opd loss"], loss_dict["opd per-token loss"], bool(skipped),
                                 grad_norm, optimizer_lr(rest), paper_tokens, self.skipped_long_prompts)
            record.update(routing)
            self.metrics.log(record, step)
            for key, value in routing.items():
                loss_dict[f"opd {key.replace('/', ' ').replace('_', ' ')}"] = torch.tensor(value)
            for key in ("committed_per_forward", "rollout_len", "teacher_nll", "answer_tokens",
                        "partially_masked_share"):
                value = inputs.metrics.get(key)
                if value is not None and math.isfinite(value):
                    loss_dict[f"opd {key.replace('_', ' ')}"] = torch.tensor(float(value))
        return result

    @contextlib.contextmanager
    def installed(self):
        """Wraps ``megatron.training.training.train_step`` while the block runs."""
        import megatron.training.training as mlm_training

        original = mlm_training.train_step

        def wrapped(*args, **kwargs):
            return self.train_step(original, *args, **kwargs)

        mlm_training.train_step = wrapped
        try:
            yield self
        finally:
            mlm_training.train_step = original
            if self.metrics is not None:
                self.metrics.close()
