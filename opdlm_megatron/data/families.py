"""Prompt families generated here, with exact scorers, beside reasoning-gym's datasets.

Block-diffusion students decode several tokens per forward only where their teacher is sure of
them; these families have short answers that follow from the prompt (copy a sentence, count, reformat
a date, convert a unit, read a field of a JSON object, spell a number, ...), the kind of structured
output on which diffusion LMs are reported to decode fastest. Each family is a dataset with the
interface of reasoning-gym's (``len``, ``[i]`` -> ``{"question", "answer", "metadata"}``,
``score_answer(answer, entry)`` in [0, 1]), so training (``data.source: reasoning_gym`` with
``data.gym_datasets: [opdlm/copy_sentence, chain_sum]``) and evaluation (``opdlm-eval --task
opdlm/copy_sentence``) take them by name like reasoning-gym's: ``create_dataset(name, size, seed)``
serves both kinds.

Scoring is exact after a family-specific normalisation of whitespace (and of case where the answer's
case does not matter); the whole completion is the answer (``EXTRACTION``).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable, Dict, List, Tuple

PREFIX = "opdlm/"
EXTRACTION = "none"  # the answer is the whole completion

_NOUNS = ["cat", "river", "teacher", "garden", "window", "train", "apple", "doctor", "city", "letter", "mountain",
          "bottle", "child", "song", "bridge", "market", "engine", "island", "candle", "forest", "pilot", "kettle"]
_VERBS = ["sees", "finds", "paints", "follows", "carries", "opens", "builds", "visits", "moves", "cleans", "reads"]
_ADJECTIVES = ["red", "quiet", "small", "old", "bright", "heavy", "green", "happy", "cold", "tall", "busy"]
_NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
_CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Dakar", "Hanoi", "Perth", "Bern", "Accra"]
_FRUITS = ["apple", "pear", "fig", "plum", "kiwi", "lime", "mango", "grape", "peach", "melon", "cherry", "lemon"]
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_UNITS = [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
          ("kilograms", "grams", 1000), ("days", "hours", 24), ("meters", "centimeters", 100)]


def number_words(n: int) -> str:
    if not 0 <= n < 100:
        raise ValueError(f"number_words covers 0-99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}.")


def _copy_sentence(rng):
    s = _sentence(rng)
    return f"Repeat the following sentence exactly, and write nothing else:\n{s}", s


def _count_up(rng):
    start = rng.randint(1, 60)
    count = rng.randint(5, 8)
    answer = ", ".join(str(start + i) for i in range(count))
    return (f"Count from {start} to {start + count - 1}, writing the numbers separated by commas. "
            f"Write nothing else."), answer


def _next_numbers(rng):
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    shown = [start + step * i for i in range(4)]
    nxt = [start + step * i for i in range(4, 8)]
    return (f"Continue the sequence {', '.join(map(str, shown))} with its next four numbers, separated by commas. "
            f"Write only those four numbers."), ", ".join(map(str, nxt))


def _date_format(rng):
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return (f"Rewrite the date {year:04d}-{month:02d}-{day:02d} in the format DD/MM/YYYY. Answer with the date only."), \
        f"{day:02d}/{month:02d}/{year:04d}"


def _unit_convert(rng):
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 12)
    return f"How many {small} are in {n} {big}? Answer with the number only.", str(n * factor)


def _json_field(rng):
    record = {"name": rng.choice(_NAMES), "city": rng.choice(_CITIES), "fruit": rng.choice(_FRUITS),
              "age": rng.randint(18, 80)}
    key = rng.choice(sorted(record))
    return (f"Here is a JSON object: {json.dumps(record)}\nWhat is the value of \"{key}\"? Answer with the value only."), \
        str(record[key])


def _spell_number(rng):
    n = rng.randint(21, 99)
    return (f"Write the number {n} in English words, in lowercase (for example 34 is thirty-four). "
            f"Answer with the words only."), number_words(n)


def _uppercase(rng):
    words = " ".join([rng.choice(_ADJECTIVES), rng.choice(_NOUNS), "and", rng.choice(_ADJECTIVES), rng.choice(_NOUNS)])
    return f"Rewrite this phrase in capital letters, and write nothing else: {words}", words.upper()


def _numbered_list(rng):
    items = rng.sample(_FRUITS, rng.randint(3, 5))
    return (f"Write these items as a numbered list, one per line (1. first item): {', '.join(items)}. "
            f"Write nothing else."), "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def _alphabet_next(rng):
    start = rng.randint(0, 20)
    letters = [chr(ord("a") + start + i) for i in range(1, 6)]
    return (f"Write the five letters of the alphabet that come after {chr(ord('a') + start)}, separated by spaces. "
            f"Write nothing else."), " ".join(letters)


def _loose(text: str) -> str:
    """Case-insensitive, whitespace collapsed, a final period dropped."""
    return re.sub(r"\s+", " ", (text or "").strip()).rstrip(".").lower()


def _exact(text: str) -> str:
    """Whitespace at the ends and inside each line collapsed; case kept."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in (text or "").strip().splitlines()]
    return "\n".join(line for line in lines if line)


# name -> (generator of (question, answer), normaliser applied to both answer and reference)
FAMILIES: Dict[str, Tuple[Callable[[random.Random], Tuple[str, str]], Callable[[str], str]]] = {
    "copy_sentence": (_copy_sentence, _exact),
    "count_up": (_count_up, _loose),
    "next_numbers": (_next_numbers, _loose),
    "date_format": (_date_format, _loose),
    "unit_convert": (_unit_convert, _loose),
    "json_field": (_json_field, _loose),
    "spell_number": (_spell_number, _loose),
    "uppercase": (_uppercase, _exact),
    "numbered_list": (_numbered_list, _exact),
    "alphabet_next": (_alphabet_next, _loose),
}


def family_names() -> List[str]:
    return [PREFIX + name for name in FAMILIES]


def is_family(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX):] in FAMILIES


class FamilyDataset:
    """``size`` items of one family, item ``i`` drawn from ``(seed, i)`` (any subset is reproducible).

    ``shots``: each question starts with that many solved examples of the same family (drawn from their
    own stream, so the item itself is the same with and without them): a small model that does not yet
    follow the instruction sees the expected format, as few-shot evaluation does."""

    def __init__(self, name: str, size: int, seed: int, shots: int = 0) -> None:
        if not is_family(name):
            raise ValueError(f"unknown family {name!r}; known: {family_names()}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not isinstance(shots, int) or isinstance(shots, bool) or not 0 <= shots <= 8:
            raise ValueError(f"family option shots must be an integer in [0, 8], got {shots!r}")
        self.name, self.size, self.seed, self.shots = name, size, seed, shots
        self.generate, self.normalize = FAMILIES[name[len(PREFIX):]]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        question, answer = self.generate(random.Random(f"{self.name}/{self.seed}/{index}"))
        if self.shots:
            shots_rng = random.Random(f"{self.name}/{self.seed}/{index}/shots")
            solved = [self.generate(shots_rng) for _ in range(self.shots)]
            question = "".join(f"Example:\n{q}\nAnswer: {a}\n\n" for q, a in solved) + question
        return {"question": question, "answer": answer, "metadata": {"family": self.name, "index": index}}

    def score_answer(self, answer: str, entry: Dict[str, Any]) -> float:
        return float(self.normalize(answer) == self.normalize(entry["answer"]))


def create_dataset(name: str, size: int, seed: int, **options):
    """A family (``opdlm/...``) or a reasoning-gym dataset by name."""
    if name.startswith(PREFIX):
        unknown = sorted(set(options) - {"shots"})
        if unknown:
            raise ValueError(f"family {name!r} takes only the option 'shots', got {unknown}")
        return FamilyDataset(name, size, seed, **options)
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **options)


def dataset_known(name: str) -> bool:
    if name.startswith(PREFIX):
        return is_family(name)
    from reasoning_gym.factory import DATASETS

    return name in DATASETS
