"""``opd_tcs`` and ``tcs``: Target Concrete Score (TCS) targets for AR -> block-DLM distillation.

The OPD target of answer position i is ``q_OPD,i = p_AR(. | x0_<i)``: it ignores that a block-diffusion
student predicts token i together with the rest of its block. TCS re-scores the teacher's top-K
candidates ``C_i`` by how well each fits the rest of the block (positions ``i+1 .. e-1``, ``e`` the
end of i's block):

    s(v) = log p_AR(v | x0_<i) + sum_{j=i+1}^{e-1} log p_AR(x0_j | x0_<i, v, x0_{i+1:j})
    q_TCS = softmax_{C_i}(s),   q_hat_i = mass_i q_TCS on C_i and q_OPD,i elsewhere (mass_i = q_OPD,i(C_i))

Scoring every candidate costs K teacher branches of <= b-1 tokens per position, so only a random
subset R of positions is corrected, ``P(i in R) = pi_i`` (1 where the teacher's and the student's
argmax disagree, ``tcs.route_prob`` elsewhere), and the estimate is importance weighted:

    loss = L_OPD + lambda * sum_{i in R} (KL(q_hat_i || p_s) - KL(q_OPD,i || p_s)) / pi_i / n

with n the loss's normaliser (the supervised tokens: per row with ``loss.normalization: row``, as in
the method's description, over the global batch with the default ``token``), so its expectation
over R is ``L_OPD + lambda * (L_TCS - L_OPD)``. No 1/t weights. Where ``lambda / pi > 1`` the routed
term ``(1 - w) KL(q_OPD || p) + w KL(q_hat || p)`` puts negative weight on q_OPD: its gradient target
``q_OPD + w (q_hat - q_OPD)`` can go negative, and the term is then unbounded below in the student's
logits (the expectation is fine; single steps are not). ``tcs.max_weight`` caps w (biased).

The branches of a row fork off the teacher's trunk ``[prompt; x0]`` in one forward
(``FrozenTeacher.branch_log_probs``), which computes the trunk's keys and values once for all of
them, through megatron's schedule (TP/PP).

* ``opd_tcs``: OPD's states (the student's own rollouts, one state of each trajectory).
* ``tcs``: off-policy: the cached teacher answers under random masking (as ``kd_off``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..config.checks import in_range, positive_int
from ..distill.teacher import TeacherTargets
from ..model import vocab_parallel as vp
from ..model.losses import TeacherTopK, unused_vocab_columns
from ..runtime.distributed import broadcast_from_last_stage
from .base import Objective, SupervisedBatch, TargetTools, random_mask_batch, register_objective, trajectory_batch


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

    def __post_init__(self) -> None:
        positive_int("tcs.candidates", self.candidates)
        in_range("tcs.route_prob", self.route_prob, 0.0, 1.0, low_open=True)
        if self.max_weight is not None and not self.max_weight > 0:
            raise ValueError(f"tcs.max_weight must be > 0 or null, got {self.max_weight!r}")
        if not self.weight >= 0:
            raise ValueError(f"tcs.weight must be >= 0, got {self.weight!r}")


def route(disagree: Tensor, uniform: Tensor, route_prob: float, weight: float,
          max_weight: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """``(routed, w)``: position i is routed when ``uniform_i < pi_i`` (pi_i = 1 where ``disagree``,
    else ``route_prob``); routed positions get ``w = weight / pi_i``, the others 0, so that
    ``E[sum_i w_i d_i] = weight * sum_i d_i`` for any per-position values d. ``max_weight`` caps w
    (and gives up that equality)."""
    pi = torch.where(disagree, torch.ones_like(uniform), torch.full_like(uniform, route_prob))
    routed = uniform < pi
    w = weight / pi
    if max_weight is not None:
        w = w.clamp_max(max_weight)
    return routed, torch.where(routed, w, torch.zeros_like(pi))


def block_ends(forks: Tensor, answer_valid: Tensor, block_size: int) -> Tensor:
    """The exclusive end ``e`` of the block of each fork ``(b, i)`` ``[F, 2]``: the block's last
    position + 1, or the answer's end when it ends inside the block."""
    lengths = answer_valid.sum(-1)[forks[:, 0]]
    return torch.minimum((forks[:, 1] // block_size + 1) * block_size, lengths)


def tcs_log_targets(candidate_log_probs: Tensor, branch_log_probs: Tensor) -> Tuple[Tensor, Tensor]:
    """``(log q_hat on the candidates [F, K], log mass [F])`` from the candidates' log q_OPD and the
    branches' log-likelihood of the rest of the block: ``log q_hat(v) = log mass + log_softmax(s)(v)``."""
    scores = candidate_log_probs.double() + branch_log_probs.double()
    log_mass = torch.logsumexp(candidate_log_probs.double(), -1)
    return log_mass[:, None] + torch.log_softmax(scores, -1), log_mass


def _candidates(targets: TeacherTargets, k: int, excluded: Tensor, renormalize_top_k: bool):
    """On the last stage: the teacher's top-k ids ``[N, k]``, their log q_OPD ``[N, k]`` and the
    targets' log-normaliser ``[N]`` (the one the loss uses), for the packed target rows."""
    logits = targets.logits
    if isinstance(logits, TeacherTopK):
        values = logits.values.float()
        norm = torch.logsumexp(values, -1) if renormalize_top_k else logits.logsumexp.float()
        return logits.indices[:, :k], values[:, :k] - norm[:, None], norm
    masked = logits.float().masked_fill(excluded.to(logits.device), float("-inf"))
    norm = vp.global_logsumexp(masked)
    values, ids = vp.global_topk(masked, k)
    return ids, values - norm[:, None], norm


def _corrected_logits(targets: TeacherTargets, slots: Tensor, ids: Tensor, new_values: Tensor):
    """The packed target rows ``slots`` with the logits of the candidates ``ids`` ``[R, K]`` set to
    ``new_values`` (fp32; a full-vocabulary shard holds only the ids in its range)."""
    logits = targets.logits
    if isinstance(logits, TeacherTopK):
        rows = logits[slots.to(logits.values.device)]
        values = rows.values.float().clone()
        values[:, :ids.shape[1]] = new_values.to(values.device)
        return TeacherTopK(values, rows.indices, rows.logsumexp)
    rows = logits[slots.to(logits.device)].float().clone()
    local = ids.to(rows.device) - vp.vocab_start(rows.shape[-1])
    inside = (local >= 0) & (local < rows.shape[-1])
    which = inside.nonzero(as_tuple=True)
    rows[which[0], local[which]] = new_values.to(rows.device)[which]
    return rows


class _TCSBase(Objective):
    distill = True
    settings = TCSConfig()  # the run's ``tcs`` section after ``configure``

    def configure(self, cfg) -> None:
        self.settings = cfg.tcs

    def validate_config(self, cfg) -> None:
        super().validate_config(cfg)
        if cfg.block_size is not None and cfg.block_size < 2:
            raise ValueError(f"objective {self.name!r} scores the rest of each block: block_size must be > 1, "
                             f"got {cfg.block_size}")
        if cfg.loss.top_k is not None and cfg.loss.top_k < cfg.tcs.candidates:
            raise ValueError(f"loss.top_k {cfg.loss.top_k} keeps fewer teacher tokens than tcs.candidates "
                             f"{cfg.tcs.candidates}; set loss.top_k >= tcs.candidates or None")

    # the states TCS corrects the targets of: those of opd (trajectory_batch) or of kd_off (random_mask_batch)
    states_of: Callable[..., SupervisedBatch]

    def build(self, answers, generator, ctx):
        if ctx.block_size < 2:
            raise ValueError(f"objective {self.name!r} scores the rest of each block: block size must be > 1, "
                             f"got {ctx.block_size}")
        batch = type(self).states_of(answers, generator, ctx)
        batch.uniform = torch.rand(batch.supervised.shape, generator=generator)
        return batch

    def refine_targets(self, batch: SupervisedBatch, targets: TeacherTargets,
                       tools: TargetTools) -> Tuple[TeacherTargets, Dict[str, float]]:
        from megatron.core import parallel_state

        settings, teacher = self.settings, tools.teacher
        supervised = batch.supervised & batch.answers.answer_valid
        positions = supervised.nonzero()  # [N, 2], row-major: the packed targets' order
        count = positions.shape[0]
        if count == 0 or settings.weight == 0:
            return targets, {"tcs_routed_share": 0.0, "tcs_disagree_share": 0.0}
        slots = targets.index[positions[:, 0], positions[:, 1]]
        k = settings.candidates
        # 1. the teacher's top-K candidates and their log q_OPD (last stage), on every rank
        box = torch.zeros(count, 2 * k + 1, dtype=torch.float64)
        norm = None
        if parallel_state.is_pipeline_last_stage():
            excluded = unused_vocab_columns(teacher.config)
            all_ids, all_logp, norm = _candidates(targets, k, excluded, tools.renormalize_top_k)
            take = slots.to(all_ids.device)
            box[:, :k], box[:, k:2 * k] = all_ids[take].double().cpu(), all_logp[take].double().cpu()
            box[:, 2 * k] = norm[take].double().cpu()
        broadcast_from_last_stage(box)
        k = int(min(k, box.shape[1]))
        ids, logp, norm = box[:, :k].long(), box[:, k:2 * k], box[:, 2 * k]
        # 2. routing: disagreement of the argmaxes on the supervised state
        student = tools.score_student(batch.answers, batch.xt, supervised)
        disagree = student.argmax[positions[:, 0], positions[:, 1]] != ids[:, 0]
        routed, weights = route(disagree, batch.uniform[positions[:, 0], positions[:, 1]], settings.route_prob,
                                settings.weight, settings.max_weight)
        metrics = {"tcs_routed_share": float(routed.double().mean()),
                   "tcs_disagree_share": float(disagree.double().mean())}
        if not bool(routed.any()):
            return targets, metrics
        # 3. branches of the routed positions: the rest of each block after each candidate
        forks = positions[routed]
        r = batch.answers
        branch = teacher.branch_log_probs(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, forks,
                                          ids[routed], block_ends(forks, r.answer_valid, tools.block_size),
                                          tools.micro_batch_size, tools.chunk_tokens)
        log_q_hat, _ = tcs_log_targets(logp[routed], branch)
        # 4. q_hat as logits with the targets' normaliser: log q_hat + norm
        correction_index = torch.full(r.answer_ids.shape, -1, dtype=torch.long)
        correction_index[forks[:, 0], forks[:, 1]] = torch.arange(forks.shape[0])
        correction_weight = torch.zeros(r.answer_ids.shape, dtype=torch.float32)
        correction_weight[forks[:, 0], forks[:, 1]] = weights[routed].float()
        corrected = None
        if parallel_state.is_pipeline_last_stage():
            new_values = (log_q_hat + norm[routed][:, None]).float()
            corrected = _corrected_logits(targets, slots[routed], ids[routed], new_values)
        return TeacherTargets(targets.index, targets.logits, targets.answer_nll, correction_index, corrected,
                              correction_weight), metrics


@register_objective
class OnPolicyTCS(_TCSBase):
    name = "opd_tcs"
    answers = "student"
    states_of = trajectory_batch
    summary = "OPD states, teacher targets TCS-corrected on routed positions"


@register_objective
class OffPolicyTCS(_TCSBase):
    name = "tcs"
    answers = "teacher"
    states_of = random_mask_batch
    summary = "cached teacher answers, random masking, TCS-corrected teacher targets"
