"""Token choice and confidence on vocab-parallel logits, and the commit rules.

Every function takes this tensor-parallel rank's logit shard ``[N, V/TP]`` (padded rows and
[MASK] already set to -inf by ``model.mask_unused_vocab``) and communicates only per-token scalars
or k candidates (``vocab_parallel``), never the full vocabulary.

Sampling is Gumbel-max: ``argmax(logits / T + g)`` with ``g`` a Gumbel variate derived from a
counter-based hash of (slot key, global vocabulary index). The draw for a vocabulary entry is
therefore the same whichever rank holds it, so a seeded rollout gives the same tokens at any TP
size, and the same batch row at any batch composition.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..model import vocab_parallel as vp
from .config import DecodeConfig

_M32 = 0xFFFFFFFF
_TOP_P_BISECTION_STEPS = 30
_TOP_P_WINDOW = 60.0  # logits more than this below the max carry < e^-60 mass each


# ------------------------------------------------------------------------------ counter hash
def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for 0 <= x < 2**32 without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def fmix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser (a bijection on [0, 2**32)), on int64 tensors."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def slot_keys(seed: int, *counters: Tensor) -> Tuple[Tensor, Tensor]:
    """Two independent 32-bit keys per slot from the seed and integer counters (same shapes)."""
    k1 = torch.full_like(counters[0], seed, dtype=torch.int64)
    k1 = fmix32(k1 ^ 0x3C6EF372)
    for c in counters:
        k1 = fmix32(k1 ^ (c.long() & _M32))
    k2 = fmix32(k1 ^ 0x5851F42D)
    return k1, k2


def gumbel_noise(keys: Tuple[Tensor, Tensor], vocab_ids: Tensor) -> Tensor:
    """Gumbel(0, 1) variates ``[N, V_shard]`` for slot keys ``[N]`` and global vocab ids ``[V_shard]``."""
    k1, k2 = keys
    h = fmix32(fmix32(vocab_ids[None, :] ^ k1[:, None]) ^ k2[:, None])
    u = (h.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


# --------------------------------------------------------------------------------- filtering
def _shard_vocab_ids(logits: Tensor) -> Tensor:
    start = vp.vocab_start(logits.shape[-1])
    return torch.arange(start, start + logits.shape[-1], device=logits.device)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keeps the k largest logits of the full vocabulary (ties at the k-th value are kept)."""
    kth = vp.global_topk(logits, k)[0][..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keeps the smallest set of largest logits whose probability mass reaches ``p``.

    The cut-off logit is found by bisection on the threshold, each step all-reducing one mass per
    token, so the sorted full-vocabulary distribution is never assembled.
    """
    if p >= 1.0:
        return logits
    lse = vp.global_logsumexp(logits)
    hi = vp.global_max(logits)  # mass(>= hi) = p_max
    lo = hi - _TOP_P_WINDOW  # mass(>= lo) ~ 1 >= p
    probs = torch.exp(logits - lse[..., None])

    def mass_at_least(threshold: Tensor) -> Tensor:
        return vp.tp_sum(torch.where(logits >= threshold[..., None], probs, torch.zeros_like(probs)).sum(-1))

    top_enough = mass_at_least(hi) >= p
    for _ in range(_TOP_P_BISECTION_STEPS):
        mid = (lo + hi) / 2
        enough = mass_at_least(mid) >= p
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid)
    cut = torch.where(top_enough, vp.global_max(logits), lo)
    return logits.masked_fill(logits < cut[..., None], float("-inf"))


# ------------------------------------------------------------------------------ token choice
def choose_tokens(logits: Tensor, decode: DecodeConfig, keys: Optional[Tuple[Tensor, Tensor]] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Chosen global token ids ``[N]`` and their confidence ``[N]`` for logit shards ``[N, V/TP]``.

    Greedy when ``decode.temperature == 0``; otherwise a Gumbel-max draw from the tempered,
    ``top_k``/``top_p``-filtered distribution (``keys`` from ``slot_keys`` required). Confidence is
    always measured on the model's own distribution (untempered, unfiltered), as LLaDA and
    Fast-dLLM do, so the commit schedule does not collapse when a filter leaves a single candidate.
    """
    model_logits = logits.float()
    if decode.greedy:
        tokens = vp.global_argmax(model_logits)[1]
    else:
        if keys is None:
            raise ValueError("sampling with temperature > 0 needs slot keys")
        dist = model_logits / decode.temperature
        if decode.top_k is not None:
            dist = top_k_filter(dist, decode.top_k)
        if decode.top_p is not None:
            dist = top_p_filter(dist, decode.top_p)
        noise = gumbel_noise(keys, _shard_vocab_ids(dist)).to(dist.dtype)
        tokens = vp.global_argmax(dist + noise)[1]
    return tokens, confidence(model_logits, tokens, decode.confidence)


def confidence(dist: Tensor, tokens: Tensor, measure: str) -> Tensor:
    """Confidence ``[N]`` of the chosen ``tokens`` under logit shards ``dist`` ``[N, V/TP]``."""
    lse = vp.global_logsumexp(dist)
    if measure == "probability":
        return torch.exp(vp.gather_global_columns(dist, tokens[:, None])[:, 0] - lse)
    if measure == "margin":
        top2 = vp.global_topk(dist, 2)[0]
        probs = torch.exp(top2 - lse[:, None])
        second = probs[:, 1] if probs.shape[1] > 1 else torch.zeros_like(probs[:, 0])
        return probs[:, 0] - second
    if measure == "neg_entropy":
        logp = dist - lse[:, None]
        p = torch.exp(logp)
        plogp = vp.tp_sum(torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))
        return torch.exp(plogp)
    raise ValueError(f"unknown confidence measure {measure!r}")


# ------------------------------------------------------------------------------ commit rules
def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) ``[N]`` of the full-vocabulary distributions of logit shards ``[N, V/TP]``."""
    lse = vp.global_logsumexp(logits)
    logp = logits.float() - lse[:, None]
    p = torch.exp(logp)
    return -vp.tp_sum(torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))


def _ranks(score: Tensor, masked: Tensor, descending: bool) -> Tensor:
    """Rank ``[R, b]`` of every masked slot by ``score`` (0 = first); unmasked slots rank last."""
    fill = float("-inf") if descending else float("inf")
    ranked = torch.where(masked, score.float(), torch.full_like(score, fill, dtype=torch.float32))
    order = ranked.argsort(dim=-1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def _run_cummax(value: Tensor, inside: Tensor) -> Tensor:
    """Running max from the left that restarts after every slot outside a run (``inside`` False)."""
    out = value.clone()
    for j in range(1, value.shape[-1]):  # blocks are a few slots wide
        carry = torch.where(inside[:, j - 1] & inside[:, j], out[:, j - 1], torch.full_like(out[:, j], float("-inf")))
        out[:, j] = torch.maximum(value[:, j], carry)
    return out


def select_commits(conf: Tensor, masked: Tensor, step_in_block: Tensor, decode: DecodeConfig,
                   entropies: Optional[Tensor] = None) -> Tensor:
    """Which slots ``[R, b]`` of the current blocks to commit this step (``DecodeConfig`` rules).

    ``conf`` ``[R, b]`` confidences, ``masked`` ``[R, b]`` slots still masked, ``step_in_block``
    ``[R]`` steps already spent on each row's block, ``entropies`` ``[R, b]`` (the entropy-bounded
    rule only). At least the first masked slot in the rule's order is committed; on the block's last
    allowed step every masked slot is.
    """
    rule = decode.rule
    if rule == "entropy_bounded":
        if entropies is None:
            raise ValueError("the entropy-bounded rule needs the slots' entropies")
        rank = _ranks(entropies, masked, descending=False)
        ordered = torch.where(masked, entropies.float(), torch.zeros_like(entropies, dtype=torch.float32))
        # cumulative entropy in rank order, scattered back to the slots
        order = rank.argsort(dim=-1)
        cumulative = ordered.gather(-1, order).cumsum(-1).gather(-1, rank)
        commit = (cumulative <= decode.entropy_budget) | (rank == 0)
    else:
        rank = _ranks(conf, masked, descending=True)
        if rule == "static":
            commit = rank < decode.tokens_per_step
        elif rule == "hierarchical":
            c = conf.float()
            # a slot heads its run's choice if it is the most confident masked slot of its run of
            # consecutive masked slots (ties: the leftmost): compare it with its run's running max
            # from the left and from the right
            neg = torch.full_like(c, float("-inf"))
            value = torch.where(masked, c, neg)
            left = _run_cummax(value, masked)
            right = _run_cummax(value.flip(-1), masked.flip(-1)).flip(-1)
            before = torch.cat([neg[:, :1], left[:, :-1]], -1)  # max of the run strictly to the left
            before = torch.where(torch.cat([masked[:, :1] & False, masked[:, :-1]], -1), before, neg)
            heads = masked & (value > before) & (value >= right)
            commit = (heads & (c > decode.low_threshold)) | (masked & (c > decode.threshold))
            # nothing above the low threshold (or above both): the single most confident slot
            commit = commit | ((rank == 0) & ~(masked & commit).any(-1, keepdim=True))
        elif rule == "factor":
            # n-th most confident slot (rank n - 1) passes if c >= 1 - f / (n + 1); take the largest such n
            passes = masked & (conf.float() >= 1.0 - decode.factor / (rank.float() + 2.0))
            best = torch.where(passes, rank, torch.full_like(rank, -1)).amax(-1, keepdim=True)
            commit = (rank <= best) | (rank == 0)
        else:
            commit = (conf.float() >= decode.threshold) | (rank == 0)
    last_step = (step_in_block + 1 >= decode.steps_per_block)[:, None]
    return masked & (commit | last_step)
