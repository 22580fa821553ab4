"""Decoding evaluation prompts with a student (block diffusion, any commit rule) or an AR teacher
(causal decoding) and scoring the answers; every rank runs it (TP/PP collectives), rank 0 reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch

from ..config.model import ModelConfig
from ..rollout.config import DecodeConfig
from .tasks import EvalItem

PAPER_SWEEP = (("tau", 0.5), ("tau", 0.7), ("tau", 0.9), ("tau", 0.95), ("k", 1), ("k", 2))
# Fast-dLLM's factor rule, the entropy-bounded sampler, dInfer's hierarchical rule (low threshold 0.4)
FAST_RULES = (("factor", 1.0), ("eb", 0.5), ("hier", 0.4))


@dataclass(frozen=True)
class DecodeSetting:
    """A commit rule and its parameter: ``tau`` (confidence threshold), ``k`` (static tokens per
    step), ``factor`` (Fast-dLLM's factor f), ``eb`` (entropy budget gamma) or ``hier`` (dInfer's
    hierarchical rule with this low threshold; the high threshold is tau = 0.9)."""

    rule: str
    value: float

    @property
    def name(self) -> str:
        return f"k={int(self.value)}" if self.rule == "k" else f"{self.rule}={self.value:g}"

    def apply(self, decode: DecodeConfig) -> DecodeConfig:
        if self.rule == "tau":
            return replace(decode, commit_rule="threshold", threshold=float(self.value), tokens_per_step=None)
        if self.rule == "k":
            return replace(decode, commit_rule="static", tokens_per_step=int(self.value))
        if self.rule == "factor":
            return replace(decode, commit_rule="factor", factor=float(self.value), tokens_per_step=None)
        if self.rule == "eb":
            return replace(decode, commit_rule="entropy_bounded", entropy_budget=float(self.value),
                           tokens_per_step=None)
        if self.rule == "hier":
            return replace(decode, commit_rule="hierarchical", low_threshold=float(self.value), threshold=0.9,
                           tokens_per_step=None)
        raise ValueError(f"unknown decode rule {self.rule!r}; expected tau, k, factor, eb or hier")


@dataclass
class Generation:
    """One decoded answer."""

    ids: List[int]
    finished: bool
    forwards: int
    seconds: float


def ar_config(config: ModelConfig) -> ModelConfig:
    """An AR model decoded by the engine: blocks of one token with the next-token (shifted) head."""
    return config.replace(block_size=1, logit_shift=True)


def generate(model, config: ModelConfig, prompts: Sequence[Sequence[int]], decode: DecodeConfig, batch_size: int,
             progress=None) -> List[Generation]:
    """Decodes ``prompts`` in batches with the rollout engine (collective on every rank)."""
    from ..rollout.engine import DiffusionRolloutEngine

    engine = DiffusionRolloutEngine(model, config)
    out: List[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        began = time.perf_counter()
        with torch.no_grad():
            result = engine.generate(batch, replace(decode, row_offset=start))
        seconds = (time.perf_counter() - began) / len(batch)
        for row, ids in enumerate(result.completions()):
            out.append(Generation(ids, bool(result.finished[row]), int(result.num_rounds[row]), seconds))
        if progress is not None:
            progress.update(len(batch))
    return out


def score_generations(items: Sequence[EvalItem], generations: Sequence[Generation], tokenizer, model: str,
                      setting: str, seed: int) -> List[dict]:
    """Per-sample records (the evaluation's JSONL rows)."""
    records = []
    for item, gen in zip(items, generations):
        completion = tokenizer.decode(gen.ids, skip_special_tokens=True)
        records.append(dict(model=model, setting=setting, seed=seed, item=item.index, question=item.question,
                            reference=item.reference, completion=completion, completion_ids=gen.ids,
                            score=float(item.score(completion)), answer_tokens=len(gen.ids), forwards=gen.forwards,
                            finished=gen.finished, seconds=gen.seconds))
    return records


def student_decode(base: DecodeConfig, setting: Optional[DecodeSetting], block_size: int) -> DecodeConfig:
    """The student's DecodeConfig for a setting; ``max_new_tokens`` rounded up to whole blocks."""
    decode = replace(base, block_size=block_size,
                     max_new_tokens=-(-base.max_new_tokens // block_size) * block_size)
    return setting.apply(decode) if setting is not None else decode


def teacher_decode(base: DecodeConfig) -> DecodeConfig:
    """Greedy causal decoding (the reference the student is compared with)."""
    return replace(base, block_size=1, threshold=1.0, tokens_per_step=None, temperature=0.0)
