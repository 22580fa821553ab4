"""Evaluation metrics: accuracy with its standard error, teacher agreement, and the area under the
accuracy-TPF curve ("accuracy under parallelism")."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple


def accuracy(scores: Sequence[Sequence[float]]) -> Tuple[float, float]:
    """``(mean, standard error)`` of per-item scores ``scores[item][seed]``: the mean over items of
    each item's mean over seeds, and the standard error of that mean over items (the binomial
    ``sqrt(p (1 - p) / n)`` when each item has one 0/1 score)."""
    per_item = [sum(s) / len(s) for s in scores if len(s)]
    n = len(per_item)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(per_item) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((x - mean) ** 2 for x in per_item) / n  # population variance: binomial for 0/1 items
    return mean, math.sqrt(variance / n)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def edit_similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """``1 - edit_distance / max(len)`` (1 for two empty answers)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - edit_distance(a, b) / longest


def teacher_agreement(student: Sequence[Sequence[int]], teacher: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Task-free fidelity of a student to its teacher on the same prompts: the share of answers that
    equal the teacher's greedy answer token for token, and the mean token-level edit similarity."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student answers vs {len(teacher)} teacher answers")
    if not student:
        return {"exact": float("nan"), "edit_similarity": float("nan")}
    exact = sum(list(s) == list(t) for s, t in zip(student, teacher)) / len(student)
    similarity = sum(edit_similarity(s, t) for s, t in zip(student, teacher)) / len(student)
    return {"exact": exact, "edit_similarity": similarity}


def accuracy_under_parallelism(points: Sequence[Tuple[float, float]]) -> float:
    """Area under the accuracy-TPF frontier: ``integral_0^max TPF of best(x) dx`` where ``best(x)``
    is the highest accuracy of any setting with tokens per forward >= x. One number that grows with
    accuracy and with parallelism; an AR model (TPF 1) scores its accuracy. ``points``: (TPF, accuracy)."""
    points = [(float(t), float(a)) for t, a in points if t == t and a == a]
    if not points:
        return float("nan")
    points.sort()
    area, left = 0.0, 0.0
    for i, (tpf, _) in enumerate(points):
        best = max(a for _, a in points[i:])
        area += (tpf - left) * best
        left = tpf
    return area


def summarize_run(records: List[dict]) -> Dict[str, float]:
    """Per-setting numbers from per-sample records (``score``, ``answer_tokens``, ``forwards``,
    ``finished``, ``seconds`` of its batch share)."""
    by_item: Dict[int, List[float]] = {}
    for r in records:
        by_item.setdefault(r["item"], []).append(r["score"])
    acc, se = accuracy(list(by_item.values()))
    tokens = sum(r["answer_tokens"] for r in records)
    forwards = sum(r["forwards"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    n = max(len(records), 1)
    return {
        "accuracy": acc,
        "accuracy_se": se,
        "tokens_per_forward": tokens / forwards if forwards else float("nan"),
        "forwards_per_answer": forwards / n,
        "answer_tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
        "mean_answer_tokens": tokens / n,
        "hit_length_limit": sum(not r["finished"] for r in records) / n,
        "samples": len(records),
    }
