"""What an objective is: where its answers come from, which states it supervises, with which targets.

Every objective of the trainer (the paper's OPD, its ablations and baselines, the AR objective that
trains small teachers) runs through the same pipeline (``trainer.py``):

    data -> answers (student rollout | cached teacher responses | the dataset's responses)
         -> states (``Objective.build``: xt, which tokens are supervised, weights)
         -> targets (the frozen teacher's distributions, or the answer tokens themselves)
         -> student step (``student.student_step``) -> optimizer

An objective only declares the parts that differ (``answers``, ``distill``, ``build``; optionally
``refine_targets``, which rewrites the teacher's targets, as TCS does); adding one is one module with
a subclass registered by name (``register_objective``) and one test. Objectives that need the model
being trained (LIFT's learnability scores, TCS's routing) call ``StateContext.score_student``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from ..distill import states
from ..model.losses import answer_loss_mask
from ..rollout.types import RolloutResult

if TYPE_CHECKING:
    from ..distill.teacher import FrozenTeacher, TeacherTargets

ANSWER_SOURCES = ("student", "teacher", "dataset")
LAYOUTS = ("opd", "causal")


@dataclass(frozen=True)
class StateContext:
    """Model and loss settings the state builders need (from the student's config and ``loss.*``)."""

    mask_token_id: int
    block_size: int
    end_of_turn_ids: Sequence[int]
    include_end_of_turn: bool = True
    state_selection: str = "all_rounds"
    t_sampling: str = "sequence"
    mask_eps: float = 1e-3
    # rows per micro-batch: objectives that draw one noise level per micro-batch (LIFT) group rows by it
    micro_batch_size: int = 1
    # ``score_student(answers, xt, positions, split_data_parallel)`` -> ``scoring.StudentScores``: the
    # model being trained, no grad (``objectives/scoring.py``); None where no model is at hand
    score_student: Optional[Callable[..., Any]] = field(default=None, compare=False)


@dataclass
class TargetTools:
    """What ``Objective.refine_targets`` may use: the frozen teacher, the student scorer and the
    loss settings the targets must agree with."""

    teacher: "FrozenTeacher"
    score_student: Callable[..., Any]
    block_size: int
    micro_batch_size: int
    chunk_tokens: int = 1024
    top_k: Optional[int] = None
    renormalize_top_k: bool = True


@dataclass
class SupervisedBatch:
    """What the student step consumes: rows of (prompt, answer x0), the student's input state and
    which answer tokens carry loss.

    * ``layout``: ``"opd"`` - the student reads ``[prompt | x0 | xt]`` (masks.opd_training_batch);
      ``"causal"`` - it reads ``[prompt; x0]`` causally (``xt`` unused), as an AR model.
    * ``xt`` ``[B, A]``: the partially masked answer (``"opd"``), else None.
    * ``supervised`` ``[B, A]`` bool: tokens whose prediction enters the loss.
    * ``weights`` ``[B, A]`` or None: per-token loss weights (1/t for the masked-diffusion losses).
    * ``normalizer`` ``[B, A]`` bool: the tokens the loss is normalised by (the supervised tokens,
      or every answer token for the 1/t-weighted ELBO estimators).
    * ``distill``: targets are the teacher's distributions (else the answer tokens, cross entropy).
    * ``t`` ``[B, A]`` or None: the noise level of randomly masked states (for logging).
    * ``uniform`` ``[B, A]`` or None: per-position U(0, 1) draws an objective takes at build time for
      decisions made later (TCS's routing), so they depend on the step's seed, never on the rank.
    * ``groups`` ``[B]`` (long) or None: the answer each row is a state of, when an answer gives
      several rows (``loss.state_selection="all_rounds"``; rows of one answer are adjacent, answers in
      order). None: row ``b`` is answer ``b``. The teacher scores each answer once, micro-batches and
      data-parallel shares take whole answers (``answer_share``, ``StudentStepPlan``).
    """

    answers: RolloutResult
    supervised: Tensor
    normalizer: Tensor
    distill: bool
    layout: str = "opd"
    xt: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    t: Optional[Tensor] = None
    uniform: Optional[Tensor] = None
    groups: Optional[Tensor] = None

    def __post_init__(self) -> None:
        shape = tuple(self.answers.answer_ids.shape)
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.layout == "opd" and (self.xt is None or tuple(self.xt.shape) != shape):
            raise ValueError(f"xt {None if self.xt is None else tuple(self.xt.shape)} must have the answers' shape {shape}")
        for name in ("supervised", "normalizer", "weights", "t", "uniform"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} {tuple(value.shape)} must have the answers' shape {shape}")
        if self.supervised.dtype != torch.bool or self.normalizer.dtype != torch.bool:
            raise ValueError("supervised and normalizer must be bool tensors")
        if self.groups is not None:
            if tuple(self.groups.shape) != shape[:1] or self.groups.dtype != torch.long:
                raise ValueError(f"groups must be a long [B] = [{shape[0]}] tensor, got {tuple(self.groups.shape)} "
                                 f"{self.groups.dtype}")
            if bool((self.groups[1:] < self.groups[:-1]).any()):
                raise ValueError("the rows of one answer must be adjacent, answers in order (groups non-decreasing)")

    @property
    def batch_size(self) -> int:
        return self.answers.batch_size

    def rows(self, index: Tensor) -> "SupervisedBatch":
        """The rows ``index``, answer/prompt padding trimmed."""
        answers = self.answers.rows(index)
        width = answers.answer_ids.shape[1]

        def cut(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x[index, :width]

        return replace(self, answers=answers, supervised=cut(self.supervised), normalizer=cut(self.normalizer),
                       xt=cut(self.xt), weights=cut(self.weights), t=cut(self.t), uniform=cut(self.uniform),
                       groups=None if self.groups is None else self.groups[index])

    def answer_share(self, start: int, end: int) -> "SupervisedBatch":
        """The rows of answers ``[start, end)`` (a data-parallel rank's share of the step's answers)."""
        if self.groups is None:
            return self.rows(torch.arange(start, min(end, self.batch_size)))
        return self.rows(((self.groups >= start) & (self.groups < end)).nonzero().flatten())

    def answer_rows(self) -> Tuple[Tensor, Tensor]:
        """``(first [U], inverse [B])``: the first row of each of the ``U`` answers the rows are states
        of, and each row's answer among them (``first[inverse[b]]`` is a row with row ``b``'s x0)."""
        if self.groups is None:
            rows = torch.arange(self.batch_size)
            return rows, rows
        unique, inverse = torch.unique_consecutive(self.groups, return_inverse=True)
        first = torch.full((unique.numel(),), self.batch_size, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(self.batch_size), reduce="amin")
        return first, inverse


def kept_answer_tokens(answers: RolloutResult, ctx: StateContext) -> Tensor:
    """``[B, A]``: answer tokens up to (and, by default, including) the first end-of-turn."""
    return answer_loss_mask(answers.answer_ids, answers.answer_valid, ctx.end_of_turn_ids, ctx.include_end_of_turn)


def masked_state_batch(answers: RolloutResult, xt: Tensor, ctx: StateContext, distill: bool,
                       weights: Optional[Tensor] = None, t: Optional[Tensor] = None,
                       groups: Optional[Tensor] = None) -> SupervisedBatch:
    """The common case: supervise the kept answer tokens that are masked in ``xt``. Without weights
    the loss is normalised by the supervised tokens (paper, Algorithm 1, w(t) = 1); with 1/t weights
    by every kept answer token (the MDLM/BD3LM estimator of eq. 2)."""
    kept = kept_answer_tokens(answers, ctx)
    supervised = kept & (xt == ctx.mask_token_id)
    normalizer = supervised if weights is None else kept
    if weights is not None:
        weights = torch.where(kept, weights, torch.zeros_like(weights))
    return SupervisedBatch(answers, supervised, normalizer, distill, "opd", xt, weights, t, groups=groups)


def trajectory_batch(answers: RolloutResult, generator: torch.Generator, ctx: StateContext) -> SupervisedBatch:
    """States of the student's own trajectories (``loss.state_selection``: one round per trajectory, one
    per block, or every round of every block), supervised by the teacher (``opd``, ``opd_tcs``)."""
    if ctx.state_selection == "all_rounds":
        source, xt = states.all_round_states(answers, ctx.block_size, ctx.mask_token_id,
                                             keep=kept_answer_tokens(answers, ctx))
        return masked_state_batch(answers.rows(source, trim=False), xt, ctx, distill=True, groups=source)
    xt = states.select_states(answers, ctx.state_selection, generator, ctx.mask_token_id, block_size=ctx.block_size)
    return masked_state_batch(answers, xt, ctx, distill=True)


def random_state(answers: RolloutResult, generator: torch.Generator, ctx: StateContext) -> Tuple[Tensor, Tensor]:
    """x0 masked at rate t ~ U(eps, 1) per sequence or block (``loss.t_sampling``): ``(xt, t)``."""
    return states.forward_mask(answers.answer_ids, answers.answer_valid, ctx.block_size, generator,
                               ctx.mask_token_id, ctx.mask_eps, ctx.t_sampling)


def random_mask_batch(answers: RolloutResult, generator: torch.Generator, ctx: StateContext) -> SupervisedBatch:
    """Forward random masking of x0 supervised by the teacher with w(t) = 1 (``opd_off``, ``kd_off``, ``tcs``)."""
    xt, t = random_state(answers, generator, ctx)
    return masked_state_batch(answers, xt, ctx, distill=True, t=t)


def diffusion_ce_batch(answers: RolloutResult, generator: torch.Generator, ctx: StateContext) -> SupervisedBatch:
    """Eq. (2): random masking with the 1/t weight on every masked token, hard labels (``sft``, ``mdlm``)."""
    xt, t = random_state(answers, generator, ctx)
    weights = 1.0 / t.clamp_min(1e-6)
    return masked_state_batch(answers, xt, ctx, distill=False, weights=weights, t=t)


class Objective:
    """Base class: subclasses set ``name``, ``answers``, ``distill`` and implement ``build``.

    * ``answers``: ``"student"`` - the student's own block-diffusion rollouts (on-policy; the
      rollout-length curriculum applies); ``"teacher"`` - one offline answer of the frozen teacher per
      prompt, generated once and cached; ``"dataset"`` - the responses of the training data.
    * ``distill``: the targets are the frozen teacher's next-token distributions on ``[prompt; x0]``
      (else the answer tokens: cross entropy).
    """

    name: ClassVar[str] = ""
    answers: ClassVar[str] = "student"
    distill: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    @property
    def needs_teacher(self) -> bool:
        return self.distill or self.answers == "teacher"

    @property
    def teacher_scores_only(self) -> bool:
        """The teacher only scores answers (one causal forward over ``[prompt; x0]``): it decodes no
        answers and scores no TCS branches, so it may run the causal attention kernel."""
        return self.distill and self.answers != "teacher" and type(self).refine_targets is Objective.refine_targets

    @property
    def uses_curriculum(self) -> bool:
        return self.answers == "student"

    def configure(self, cfg: Any) -> None:
        """Takes the objective's own settings from the run's config (called once, before ``build``)."""

    def refine_targets(self, batch: SupervisedBatch, targets: "TeacherTargets",
                       tools: TargetTools) -> Tuple["TeacherTargets", Dict[str, float]]:
        """The targets the loss uses (default: the teacher's as they are) and metrics of refining them.
        A collective over the model-parallel groups when it runs a model."""
        return targets, {}

    def validate_config(self, cfg: Any) -> None:
        """Raises a ValueError naming a config value this objective cannot work with."""
        if self.answers == "dataset" and cfg.data.source not in ("text", "token_ids"):
            raise ValueError(
                f"objective {self.name!r} trains on the dataset's responses; data.source must be 'text' or "
                f"'token_ids', got {cfg.data.source!r}"
            )

    def build(self, answers: RolloutResult, generator: torch.Generator, ctx: StateContext) -> SupervisedBatch:
        """The supervised batch for ``answers`` (all randomness from ``generator``)."""
        raise NotImplementedError


_REGISTRY: Dict[str, Type[Objective]] = {}


def register_objective(cls: Type[Objective]) -> Type[Objective]:
    """Class decorator: makes ``cls`` available as ``objective: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.answers not in ANSWER_SOURCES:
        raise ValueError(f"{cls.__name__}.answers must be one of {ANSWER_SOURCES}, got {cls.answers!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"objective {cls.name!r} is registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def objective_names() -> List[str]:
    return sorted(_REGISTRY)


def get_objective(name: str) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; expected one of {objective_names()}")
    return _REGISTRY[name]()
