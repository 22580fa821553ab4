"""Distillation and masked-diffusion losses over vocab-parallel logits, chunked over tokens.

Every tensor-parallel rank holds ``logits[:, start:end]`` of the padded vocabulary. The losses here
never gather the vocabulary: per token they all-reduce a handful of scalars (max, sum of exps, the
divergence, one gradient coefficient) or, for top-k, ``k`` candidates. They process the tokens in
chunks of ``chunk_tokens`` and recompute each chunk in backward, so besides the inputs the peak
memory is a few fp32 tensors of one chunk's size plus the gradient (in the logits' dtype).

Divergences, with ``p`` the teacher and ``q`` the student distribution over the vocabulary:

* ``forward_kl``: KL(p || q) (the paper's, Algorithm 1),
* ``reverse_kl``: KL(q || p),
* ``jsd``: generalised Jensen-Shannon, ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
  ``m = beta p + (1 - beta) q`` (GKD, Agarwal et al.; ``beta = 0.5`` is the symmetric JSD).

Top-k variants restrict the sum to the teacher's ``k`` most likely tokens ``K`` (as NeMo-RL and the
paper's 4B/8B runs): with ``renormalize_top_k`` both distributions are renormalised over ``K``
(NeMo-RL's default); without, the full-vocabulary probabilities are used and only the terms of the
tokens in ``K`` are summed (NeMo-RL's ``zero_outside_topk`` for the forward KL). The teacher can be
given as full logits or as a ``TeacherTopK`` (its top-k logits, ids and log-normaliser, computed
once by ``FrozenTeacher.answer_logits(top_k=...)``), which stores ``k`` numbers per token instead
of ``V / TP``.

The gradient is closed-form. Every divergence above is ``D = sum_{i in S} F(p_i, q_i)`` over a
support ``S``; with ``h_i = q_i dF/dq_i`` and ``q = softmax(z)`` over the normalising set,
``dD/dz_j = [j in S] h_j - q_j sum_{i in S} h_i``. ``h`` is ``-p`` (forward KL),
``q (log q - log p + 1)`` (reverse KL) and ``(1 - beta) q log(q / m)`` (JSD). Cross entropy is the
forward KL to a one-hot teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..config.choices import DIVERGENCES
from . import vocab_parallel as vp

KINDS = DIVERGENCES


@dataclass(frozen=True)
class DivergenceConfig:
    """Which teacher-student divergence to minimise, and how to compute it.

    ``top_k``: None for the full vocabulary, else the teacher's top-k support.
    ``chunk_tokens``: tokens processed at once; peak memory scales with ``chunk_tokens x V/TP``.
    """

    kind: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: Optional[int] = None
    renormalize_top_k: bool = True
    chunk_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown divergence kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(
                f"jsd_beta must lie strictly between 0 and 1, got {self.jsd_beta!r} "
                "(use kind='forward_kl' or 'reverse_kl' for the end points)"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")


@dataclass
class TeacherTopK:
    """The teacher's top-k tokens per position: all that the top-k divergences need.

    ``values`` ``[..., k]`` fp32 logits sorted descending, ``indices`` ``[..., k]`` global vocabulary
    ids, ``logsumexp`` ``[...]`` over the real vocabulary (for the non-renormalised variant). The
    same on every tensor-parallel rank, and ``V / (TP k)`` times smaller than the logits shard.
    ``answer_nll`` ``[...]`` optionally carries the teacher NLL of the tokens the positions hold.
    """

    values: Tensor
    indices: Tensor
    logsumexp: Tensor
    answer_nll: Optional[Tensor] = None

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __getitem__(self, index) -> "TeacherTopK":
        nll = None if self.answer_nll is None else self.answer_nll[index]
        return TeacherTopK(self.values[index], self.indices[index], self.logsumexp[index], nll)

    def to(self, device) -> "TeacherTopK":
        nll = None if self.answer_nll is None else self.answer_nll.to(device)
        return TeacherTopK(self.values.to(device), self.indices.to(device), self.logsumexp.to(device), nll)

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: Tensor, k: int, excluded_columns: Optional[Tensor] = None,
                    chunk_tokens: int = 1024) -> "TeacherTopK":
        """Top-k of vocab-parallel teacher logits ``[..., V/TP]`` (a collective over the TP group)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        excluded = _check_excluded(excluded_columns, logits.shape[-1], logits.device)
        flat = logits.reshape(-1, logits.shape[-1])
        k = min(k, flat.shape[-1] * vp.tp_size())
        values = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
        indices = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            t = _fp32_copy(flat[sl], excluded)
            values[sl], indices[sl] = vp.global_topk(t, k)
            lse[sl] = vp.global_logsumexp(t)
        lead = logits.shape[:-1]
        return cls(values.view(*lead, k), indices.view(*lead, k), lse.view(lead))


# ------------------------------------------------------------------------------ elementwise terms
def _times(weight: Tensor, value: Tensor) -> Tensor:
    """``value *= weight`` in place, with 0 * (anything, including inf/nan) = 0, i.e. 0 log 0 = 0."""
    return value.mul_(weight).masked_fill_(weight == 0, 0.0)


def _terms_and_h(kind: str, beta: float, log_p: Tensor, log_q: Tensor):
    """Per-element divergence terms ``F(p_i, q_i)`` and gradient weights ``h_i = q_i dF/dq_i``.

    Works in place where it can: each live temporary is one chunk of fp32 logits.
    """
    if kind == "forward_kl":
        p = log_p.exp()
        return _times(p, log_p - log_q), p.neg_()
    q = log_q.exp()
    if kind == "reverse_kl":
        log_ratio = log_q - log_p
        terms = _times(q, log_ratio.clone())
        return terms, _times(q, log_ratio.add_(1.0))
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    student_part = _times(q, log_q - log_m)
    teacher_part = _times(log_p.exp(), log_p - log_m)
    del log_m
    terms = teacher_part.mul_(beta).add_(student_part, alpha=1.0 - beta)
    return terms, student_part.mul_(1.0 - beta)


def _fp32_copy(x: Tensor, excluded: Optional[Tensor]) -> Tensor:
    """A private fp32 copy of one chunk (later steps work on it in place), excluded columns at -inf."""
    x = x.to(torch.float32, copy=True)
    return x if excluded is None else x.masked_fill_(excluded, float("-inf"))


def _log_softmax_(x: Tensor) -> Tensor:
    """Full-vocabulary log-softmax of this rank's shard, in place."""
    return x.sub_(vp.global_logsumexp(x)[:, None])


def _scatter_support(grad: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """Adds ``values`` at global vocabulary ``index`` into this rank's shard ``grad`` (in place)."""
    width = grad.shape[-1]
    local = index - vp.vocab_start(width)
    inside = (local >= 0) & (local < width)
    return grad.scatter_add_(-1, local.clamp(0, width - 1), torch.where(inside, values, torch.zeros_like(values)))


def _chunk(cfg: Optional[DivergenceConfig], student: Tensor, teacher: Optional[Tensor], targets: Optional[Tensor],
           excluded: Optional[Tensor], need_grad: bool):
    """Divergence ``[n]`` (and gradient ``[n, V/TP]`` fp32) of one chunk.

    ``cfg=None`` means cross entropy to ``targets`` (ids ``[n]``) instead of a teacher.
    """
    s = _fp32_copy(student, excluded)
    if cfg is None:  # one-hot teacher on the target token
        index = targets[:, None]
        lse_s = vp.global_logsumexp(s)
        log_q = vp.gather_global_columns(s, index) - lse_s[:, None]
        terms, h = _terms_and_h("forward_kl", 0.0, torch.zeros_like(log_q), log_q)
        return _support_result(terms, h, s, lse_s, index, need_grad)

    kind, beta = cfg.kind, cfg.jsd_beta
    if isinstance(teacher, TeacherTopK):
        top_t, index = teacher.values[:, :cfg.top_k].float(), teacher.indices[:, :cfg.top_k]
        lse_t = teacher.logsumexp.float()
        return _top_k_result(cfg, s, top_t, index, lse_t, need_grad)
    t = _fp32_copy(teacher, excluded)
    if cfg.top_k is None:
        log_q, log_p = _log_softmax_(s), _log_softmax_(t)
        terms, h = _terms_and_h(kind, beta, log_p, log_q)
        value = vp.tp_sum(terms.sum(-1))
        del terms, log_p, t
        if not need_grad:
            return value, None
        h_sum = vp.tp_sum(h.sum(-1))[:, None]
        return value, h.sub_(log_q.exp_().mul_(h_sum))

    top_t, index = vp.global_topk(t, cfg.top_k)  # [n, k], identical on every rank
    lse_t = None if cfg.renormalize_top_k else vp.global_logsumexp(t)
    del t
    return _top_k_result(cfg, s, top_t, index, lse_t, need_grad)


def _top_k_result(cfg: DivergenceConfig, s: Tensor, top_t: Tensor, index: Tensor, lse_t: Optional[Tensor],
                  need_grad: bool):
    """Top-k divergence of one chunk given the teacher's top-k logits, their ids and log-normaliser."""
    kind, beta = cfg.kind, cfg.jsd_beta
    top_s = vp.gather_global_columns(s, index)
    if cfg.renormalize_top_k:
        log_p, log_q = torch.log_softmax(top_t, -1), torch.log_softmax(top_s, -1)
        terms, h = _terms_and_h(kind, beta, log_p, log_q)
        value = terms.sum(-1)
        if not need_grad:
            return value, None
        grad_k = h - log_q.exp() * h.sum(-1, keepdim=True)
        return value, _scatter_support(torch.zeros_like(s), index, grad_k)
    lse_s = vp.global_logsumexp(s)
    log_p = top_t - lse_t[:, None]
    log_q = top_s - lse_s[:, None]
    terms, h = _terms_and_h(kind, beta, log_p, log_q)
    return _support_result(terms, h, s, lse_s, index, need_grad)


def _support_result(terms: Tensor, h: Tensor, s: Tensor, lse_s: Tensor, index: Tensor, need_grad: bool):
    """Value and gradient of a sum over the support ``index`` with the student normalised over the vocab."""
    value = terms.sum(-1)
    if not need_grad:
        return value, None
    q = torch.exp(s - lse_s[:, None])
    grad = q.mul_(-h.sum(-1, keepdim=True))
    return value, _scatter_support(grad, index, h)


class _ChunkedLoss(torch.autograd.Function):
    """Per-token loss over vocab-parallel student logits; recomputes each chunk in backward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Union[None, Tensor, "TeacherTopK"], targets: Optional[Tensor],
                cfg: Optional[DivergenceConfig], excluded: Optional[Tensor], chunk_tokens: int) -> Tensor:
        ctx.cfg, ctx.chunk_tokens = cfg, chunk_tokens
        ctx.teacher_top_k = teacher if isinstance(teacher, TeacherTopK) else None
        ctx.save_for_backward(student, None if ctx.teacher_top_k else teacher, targets, excluded)
        values = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            values[sl] = _chunk(cfg, student[sl], _part(teacher, sl), _part(targets, sl), excluded, False)[0]
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        student, teacher, targets, excluded = ctx.saved_tensors
        teacher = ctx.teacher_top_k or teacher
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_tokens):
            sl = slice(start, start + ctx.chunk_tokens)
            _, g = _chunk(ctx.cfg, student[sl], _part(teacher, sl), _part(targets, sl), excluded, True)
            grad[sl] = g.mul_(grad_values[sl, None])
        return grad, None, None, None, None, None


def _part(x: Optional[Tensor], sl: slice) -> Optional[Tensor]:
    return None if x is None else x[sl]


def _check_excluded(excluded: Optional[Tensor], width: int, device) -> Optional[Tensor]:
    if excluded is None:
        return None
    if excluded.dtype != torch.bool or excluded.shape != (width,):
        raise ValueError(
            f"excluded_columns must be a bool tensor of shape ({width},), got {tuple(excluded.shape)} {excluded.dtype}"
        )
    return excluded.to(device)


# ------------------------------------------------------------------------------------ public API
def divergence(student_logits: Tensor, teacher_logits: Union[Tensor, TeacherTopK], cfg: DivergenceConfig,
               excluded_columns: Optional[Tensor] = None) -> Tensor:
    """Per-token divergence ``[N]`` (fp32) between teacher and student, from vocab-parallel logits.

    ``student_logits``/``teacher_logits``: this rank's shards ``[N, V/TP]`` (any float dtype). The
    gradient flows into ``student_logits`` only; the teacher is a constant. For the top-k variants
    the teacher may instead be a ``TeacherTopK`` with at least ``cfg.top_k`` tokens per position.
    ``excluded_columns`` ``[V/TP]`` bool marks vocabulary columns that are not real tokens
    (padding, [MASK]); both distributions give them zero probability (see ``unused_vocab_columns``).
    A collective over the tensor-parallel group: every rank must call it with the same ``N``.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [N, V/TP], got {tuple(student_logits.shape)}")
    if isinstance(teacher_logits, TeacherTopK):
        if cfg.top_k is None:
            raise ValueError("a TeacherTopK teacher needs DivergenceConfig.top_k (the full-vocabulary divergence "
                             "needs the teacher's full logits)")
        if teacher_logits.values.shape[:1] != student_logits.shape[:1] or teacher_logits.k < cfg.top_k:
            raise ValueError(f"TeacherTopK values {tuple(teacher_logits.values.shape)} must be [N, >= top_k] with "
                             f"N = {student_logits.shape[0]}, top_k = {cfg.top_k}")
        teacher = teacher_logits
    else:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits must "
                "both be [N, V/TP] with one shape"
            )
        teacher = teacher_logits.detach()
    excluded = _check_excluded(excluded_columns, student_logits.shape[-1], student_logits.device)
    return _ChunkedLoss.apply(student_logits, teacher, None, cfg, excluded, cfg.chunk_tokens)


def masked_diffusion_nll(student_logits: Tensor, targets: Tensor, excluded_columns: Optional[Tensor] = None,
                         chunk_tokens: int = 1024) -> Tensor:
    """Per-token negative log-likelihood ``[N]`` of ``targets`` (global ids ``[N]``) under the student.

    Vocab-parallel cross entropy with the same chunking as ``divergence`` (it is the forward KL to a
    one-hot teacher). Used for the masked-diffusion (MDLM/LLaDA) and SFT baselines and for the
    teacher-NLL metric.
    """
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"student logits must be [N, V/TP] and targets [N], got {tuple(student_logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    vocab = student_logits.shape[-1] * vp.tp_size()
    if targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"target id {low if low < 0 else high} is outside the vocabulary [0, {vocab})")
    excluded = _check_excluded(excluded_columns, student_logits.shape[-1], student_logits.device)
    return _ChunkedLoss.apply(student_logits, None, targets.long(), None, excluded, chunk_tokens)


def unused_vocab_columns(config, exclude_mask_token: bool = True) -> Tensor:
    """``[V/TP]`` bool: this rank's vocabulary columns that are not tokens (padding, unused rows) or
    are [MASK], for ``excluded_columns`` (``ModelConfig.unused_token_mask``)."""
    return config.unused_token_mask(*vp.vocab_shard_range(config.padded_vocab_size(vp.tp_size())),
                                   exclude_mask_token=exclude_mask_token)


def answer_loss_mask(answer_ids: Tensor, answer_valid: Tensor, end_of_turn_ids: Sequence[int],
                     include_end_of_turn: bool = True) -> Tensor:
    """``[B, A]`` bool: answer tokens that take part in the loss.

    Excludes padding and every token after the first end-of-turn token; the end-of-turn token
    itself is kept when ``include_end_of_turn`` (the paper's default). The prompt is never part of
    the answer tensors, so it is excluded by construction.
    """
    if answer_ids.shape != answer_valid.shape or answer_valid.dtype != torch.bool:
        raise ValueError(
            f"answer_ids {tuple(answer_ids.shape)} and bool answer_valid {tuple(answer_valid.shape)} "
            f"({answer_valid.dtype}) must have one shape"
        )
    eot = torch.zeros_like(answer_valid)
    for token in end_of_turn_ids:
        eot |= answer_ids == int(token)
    eot &= answer_valid
    ends_before = (eot.long().cumsum(-1) - eot.long()) > 0  # an end-of-turn occurred strictly earlier
    keep = answer_valid & ~ends_before
    if not include_end_of_turn:
        keep &= ~eot
    return keep


def row_mean(per_token: Tensor, mask: Tensor, num_rows: Optional[float] = None) -> Tensor:
    """The paper's normalisation: mean over masked tokens of each row, then mean over rows.

    Rows without a masked token are skipped. ``num_rows`` overrides the row count of the outer
    mean (to normalise a microbatch by the number of rows of the whole batch). Returns a scalar
    (0 with a gradient path when no row has a token).
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must be one [B, A] shape")
    mask = mask.to(torch.bool)
    counts = mask.sum(-1)
    sums = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    per_row = sums / counts.clamp_min(1)
    rows = float((counts > 0).sum()) if num_rows is None else float(num_rows)
    if rows <= 0:
        return per_row.sum() * 0.0
    return per_row.sum() / rows
