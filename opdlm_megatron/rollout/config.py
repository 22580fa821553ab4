"""Decoding settings of the block-diffusion rollout engine (paper section 4, appendix B)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

CONFIDENCES = ("probability", "margin", "neg_entropy")
COMMIT_RULES = ("auto", "threshold", "static", "factor", "entropy_bounded", "hierarchical")


def whole_blocks(length: int, block_size: int) -> int:
    """``length`` rounded down to whole blocks (at least one): the engine decodes whole blocks, and
    the curriculum's ``L_s`` (e.g. 100 + floor(s/10 * 3900)) need not be a multiple of the block."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return max(block_size, length - length % block_size)


@dataclass
class DecodeConfig:
    """How the student decodes an answer.

    Block diffusion: the answer is produced ``block_size`` tokens at a time; a block starts fully
    masked and each denoising step predicts every masked slot of it. A block ends when nothing is
    masked or after ``steps_per_block`` steps (the last step commits whatever is left).

    Commit rule (``commit_rule``; "auto": static when ``tokens_per_step`` is set, else threshold),
    always at least one masked slot per step:

    * ``"threshold"`` (paper, dynamic remasking): every masked slot with confidence >= ``threshold``;
    * ``"static"``: the ``tokens_per_step`` most confident masked slots;
    * ``"factor"`` (Fast-dLLM): the n most confident slots for the largest n whose n-th confidence
      c_(n) satisfies ``c_(n) >= 1 - factor / (n + 1)``;
    * ``"entropy_bounded"`` (EB-sampler): slots in order of increasing entropy (nats) while the sum
      of their entropies stays <= ``entropy_budget``;
    * ``"hierarchical"`` (dInfer's hierarchical decoder): the most confident slot of every contiguous
      run of masked slots if its confidence > ``low_threshold``, plus every masked slot with
      confidence > ``threshold``; when no masked slot reaches ``low_threshold``, only the most
      confident one. Runs of masks are decoded from their inside out, in parallel.

    Confidence (always on the model's untempered, unfiltered distribution, as LLaDA / Fast-dLLM):
    ``"probability"`` of the chosen token, ``"margin"`` top1 - top2 probability, or
    ``"neg_entropy"`` reported as ``exp(-H)`` (monotone in the negative entropy, in (0, 1], so the
    same threshold scale applies).

    Sampling: greedy when ``temperature == 0``; else Gumbel-max sampling from the tempered,
    ``top_k``/``top_p``-filtered distribution. The noise is a counter-based hash of ``seed``, the
    prompt's index in the batch plus ``row_offset`` (so a data-parallel rank decoding rows
    ``[row_offset, ...)`` of a global batch draws what one rank decoding all of it would), the
    answer position, the sequence's round and the global vocabulary
    index, so a seeded rollout is reproducible and identical at any TP/PP layout.

    ``block_size`` and ``eos_token_ids`` default (None) to the model config's values.
    ``use_cache=False`` recomputes the whole sequence every step (the naive baseline).
    """

    max_new_tokens: int = 256
    block_size: Optional[int] = None
    threshold: float = 0.9
    tokens_per_step: Optional[int] = None
    commit_rule: str = "auto"
    factor: float = 1.0
    entropy_budget: float = 0.5
    low_threshold: float = 0.4
    steps_per_block: Optional[int] = None
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    confidence: str = "probability"
    seed: int = 0
    row_offset: int = 0
    eos_token_ids: Optional[Sequence[int]] = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeConfig.{name} must be a positive integer, got {value!r}")

        positive_int("max_new_tokens")
        positive_int("block_size", allow_none=True)
        positive_int("tokens_per_step", allow_none=True)
        positive_int("steps_per_block", allow_none=True)
        positive_int("top_k", allow_none=True)
        if not isinstance(self.threshold, (int, float)) or not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"DecodeConfig.threshold must lie in (0, 1], got {self.threshold!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"DecodeConfig.temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"DecodeConfig.top_p must lie in (0, 1], got {self.top_p!r}")
        if self.commit_rule not in COMMIT_RULES:
            raise ValueError(f"unknown commit_rule {self.commit_rule!r}; expected one of {COMMIT_RULES}")
        if self.commit_rule == "static" and self.tokens_per_step is None:
            raise ValueError("commit_rule 'static' needs tokens_per_step")
        if not isinstance(self.factor, (int, float)) or self.factor <= 0:
            raise ValueError(f"DecodeConfig.factor must be > 0, got {self.factor!r}")
        if not isinstance(self.entropy_budget, (int, float)) or self.entropy_budget < 0:
            raise ValueError(f"DecodeConfig.entropy_budget must be >= 0, got {self.entropy_budget!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {self.confidence!r}; expected one of {CONFIDENCES}")
        if not isinstance(self.low_threshold, (int, float)) or not 0.0 <= float(self.low_threshold) <= 1.0:
            raise ValueError(f"DecodeConfig.low_threshold must be in [0, 1], got {self.low_threshold!r}")
        if not isinstance(self.row_offset, int) or self.row_offset < 0:
            raise ValueError(f"DecodeConfig.row_offset must be a non-negative integer, got {self.row_offset!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"DecodeConfig.seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def rule(self) -> str:
        """The commit rule in effect (``commit_rule`` with "auto" resolved)."""
        if self.commit_rule != "auto":
            return self.commit_rule
        return "static" if self.tokens_per_step is not None else "threshold"

    def resolved(self, model_block_size: int, model_eos_token_ids: Sequence[int]) -> "DecodeConfig":
        """A copy with ``block_size``/``eos_token_ids``/``steps_per_block`` filled in and checked."""
        block = self.block_size or model_block_size
        eos: List[int] = list(model_eos_token_ids if self.eos_token_ids is None else self.eos_token_ids)
        if block > self.max_new_tokens or self.max_new_tokens % block != 0:
            raise ValueError(
                f"block_size {block} does not fit max_new_tokens {self.max_new_tokens}: "
                f"max_new_tokens must be a positive multiple of the block size"
            )
        if self.tokens_per_step is not None and self.tokens_per_step > block:
            raise ValueError(f"tokens_per_step {self.tokens_per_step} exceeds the block size {block}")
        # Default: enough steps for the rule to finish the block on its own.
        static = self.rule == "static"
        steps = self.steps_per_block or (-(-block // self.tokens_per_step) if static else block)
        return dataclasses.replace(self, block_size=block, eos_token_ids=[int(t) for t in eos], steps_per_block=steps)
