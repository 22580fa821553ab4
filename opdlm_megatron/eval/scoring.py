"""Answer extraction and scoring: last number, ``\\boxed{}``, ``<answer>`` tags, exact and normalised
match, and reasoning-gym's own scorers."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Optional

EXTRACTIONS = ("auto", "last_number", "boxed", "answer_tag", "none")
MATCHES = ("exact", "normalized", "numeric")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def last_number(text: str) -> Optional[str]:
    """The last number in ``text`` (thousands separators dropped, a trailing ``.0`` kept as written),
    as GSM8K-style graders read answers; None when there is none."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    text = text or ""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth, out = start + len("\\boxed{"), 1, []
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return "".join(out).strip()
        out.append(ch)
        i += 1
    return None  # unbalanced: the answer was cut off


def answer_tag(text: str) -> Optional[str]:
    found = _ANSWER_TAG.findall(text or "")
    return found[-1].strip() if found else None


def extract(text: str, how: str = "auto") -> str:
    """The answer part of a completion. ``auto``: an ``<answer>`` tag, else ``\\boxed{}``, else the
    last number, else the whole text."""
    if how not in EXTRACTIONS:
        raise ValueError(f"unknown extraction {how!r}; expected one of {EXTRACTIONS}")
    if how == "none":
        return (text or "").strip()
    if how == "last_number":
        return last_number(text) or ""
    if how == "boxed":
        return boxed(text) or ""
    if how == "answer_tag":
        return answer_tag(text) or ""
    for candidate in (answer_tag(text), boxed(text), last_number(text)):
        if candidate:
            return candidate
    return (text or "").strip()


def normalize(text: str) -> str:
    """Case, accents, punctuation at the ends, inner whitespace and ``$``/``\\text{}`` wrappers removed."""
    text = unicodedata.normalize("NFKC", text or "").strip().lower()
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = text.replace("$", "").replace(",", "")
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!?;:'\"")


def _as_number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def match(prediction: str, reference: str, how: str = "normalized") -> bool:
    """Whether an extracted answer equals the reference: ``exact`` (after stripping), ``normalized``
    (``normalize`` on both, numbers compared as numbers), ``numeric`` (as floats only)."""
    if how not in MATCHES:
        raise ValueError(f"unknown match {how!r}; expected one of {MATCHES}")
    if how == "exact":
        return (prediction or "").strip() == (reference or "").strip()
    a, b = _as_number(normalize(prediction)), _as_number(normalize(reference))
    if a is not None and b is not None:
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    if how == "numeric":
        return False
    return normalize(prediction) == normalize(reference)


def reasoning_gym_score(dataset: Any, entry: dict, completion: str, how: str = "auto") -> float:
    """reasoning-gym's own scorer (``dataset.score_answer``) on the extracted answer, in [0, 1]."""
    return float(dataset.score_answer(answer=extract(completion, how), entry=entry))
