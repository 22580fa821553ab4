"""Evaluation tasks: prompts with references and a scorer.

* a reasoning-gym dataset by name (``basic_arithmetic``, ``chain_sum``, ``gsm_symbolic``, ...),
  created with its own difficulty options (``options``, e.g. ``{"min_terms": 2, "max_terms": 2}``)
  and scored by its own ``score_answer``;
* ``math_jsonl``: GSM8K/MATH-style JSONL (``question``, ``answer``; the reference is the answer's
  ``#### N`` / last number or ``\\boxed{}``), scored by extracting the completion's answer
  (``extract``) and comparing (``match``, numbers as numbers);
* ``jsonl``: generic JSONL (``prompt``, ``reference``), exact or normalised match.

Few-shot examples come from the same source (reasoning-gym: another seed; JSONL: the first lines,
left out of the evaluated items).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from . import scoring

FILE_TASKS = ("math_jsonl", "jsonl")


class TaskError(ValueError):
    """A task that cannot be built (unknown name, bad file, missing field); the message names it."""


def task_options_from_json(text: str) -> dict:
    """A task's ``--task-options``: a JSON object (TaskError naming the flag and the text otherwise)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise TaskError(f"--task-options is not JSON ({error.msg}): {text!r}") from None
    if not isinstance(options, dict):
        raise TaskError(f"--task-options must be a JSON object, got {text!r}")
    return options


@dataclass
class TaskSpec:
    task: str
    data: Optional[str] = None
    options: dict = field(default_factory=dict)
    num_samples: Optional[int] = None  # None: all (reasoning-gym: 100)
    seed: int = 0
    extract: str = "auto"
    match: str = "normalized"
    few_shot: int = 0
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_field: str = "prompt"
    reference_field: str = "reference"


@dataclass
class EvalItem:
    """One question: its user turn, the few-shot turns before it, the reference and a scorer."""

    index: int
    question: str
    reference: str
    score: Callable[[str], float]
    shots: List[Sequence[str]] = field(default_factory=list)  # (question, answer) pairs

    def messages(self, system_prompt: Optional[str] = None) -> List[dict]:
        turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for question, answer in self.shots:
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return turns + [{"role": "user", "content": self.question}]

    def text(self, system_prompt: Optional[str] = None) -> str:
        parts = [system_prompt.strip() + "\n\n"] if system_prompt else []
        parts += [f"Question: {q}\nAnswer: {a}\n\n" for q, a in self.shots]
        return "".join(parts) + f"Question: {self.question}\nAnswer:"


def load_task(spec: TaskSpec) -> List[EvalItem]:
    if spec.extract not in scoring.EXTRACTIONS:
        raise TaskError(f"unknown --extract {spec.extract!r}; expected one of {list(scoring.EXTRACTIONS)}")
    if spec.match not in scoring.MATCHES:
        raise TaskError(f"unknown --match {spec.match!r}; expected one of {list(scoring.MATCHES)}")
    if spec.num_samples is not None and spec.num_samples < 1:
        raise TaskError(f"--num-samples must be positive, got {spec.num_samples}")
    if spec.few_shot < 0:
        raise TaskError(f"--few-shot must be >= 0, got {spec.few_shot}")
    if spec.task in FILE_TASKS:
        return _file_task(spec)
    return _reasoning_gym_task(spec)


def _reasoning_gym_task(spec: TaskSpec) -> List[EvalItem]:
    from ..data.families import EXTRACTION, create_dataset, dataset_known, family_names, is_family

    if not dataset_known(spec.task):
        raise TaskError(f"unknown task {spec.task!r}: not a reasoning-gym dataset, a family of this project "
                        f"({', '.join(family_names())}) nor one of {list(FILE_TASKS)} "
                        f"(e.g. basic_arithmetic, chain_sum, gsm_symbolic)")
    if is_family(spec.task) and spec.extract == "auto":  # the whole completion is a family's answer
        spec = dataclasses.replace(spec, extract=EXTRACTION)
    size = spec.num_samples or 100
    try:
        dataset = create_dataset(spec.task, size=size, seed=spec.seed, **spec.options)
        shots_source = (create_dataset(spec.task, size=spec.few_shot, seed=spec.seed + 10_007, **spec.options)
                        if spec.few_shot else [])
    except Exception as error:  # reasoning-gym raises assorted errors for bad options
        raise TaskError(f"reasoning-gym dataset {spec.task!r} rejects options {spec.options}: {error}") from None
    shots = [(e["question"], str(e["answer"])) for e in shots_source]
    items = []
    for i in range(len(dataset)):
        entry = dataset[i]

        def score(completion: str, entry=entry) -> float:
            return scoring.reasoning_gym_score(dataset, entry, completion, spec.extract)

        items.append(EvalItem(i, entry["question"], str(entry["answer"]), score, shots))
    return items


def _read_jsonl(path: Optional[str]) -> List[tuple]:
    if not path:
        raise TaskError("this task reads a JSONL file: pass --data FILE")
    if not os.path.isfile(path):
        raise TaskError(f"--data file not found: {path}")
    from ..data.samples import read_jsonl  # (data imports torch; task names must stay cheap for --help)

    try:
        return read_jsonl(path)
    except ValueError as error:
        raise TaskError(str(error)) from None


def _file_task(spec: TaskSpec) -> List[EvalItem]:
    records = _read_jsonl(spec.data)
    math = spec.task == "math_jsonl"
    q_field = spec.question_field if math else spec.prompt_field
    a_field = spec.answer_field if math else spec.reference_field
    rows = []
    for number, record in records:
        for name in (q_field, a_field):
            if name not in record:
                raise TaskError(f"{spec.data}:{number}: missing field {name!r} (has {sorted(record)})")
        answer = str(record[a_field])
        reference = answer
        if math:  # GSM8K: "... #### 72"; MATH: "... \boxed{72}"
            reference = (answer.split("####")[-1].strip() if "####" in answer else
                         scoring.boxed(answer) or scoring.last_number(answer) or answer.strip())
        rows.append((str(record[q_field]), reference, answer))
    shots = [(q, full) for q, _, full in rows[:spec.few_shot]]
    rows = rows[spec.few_shot:]
    if spec.num_samples:
        rows = rows[:spec.num_samples]
    if not rows:
        raise TaskError(f"{spec.data} has no items left after {spec.few_shot} few-shot examples")
    how_extract = spec.extract if spec.extract != "auto" or not math else "auto"
    items = []
    for i, (question, reference, _) in enumerate(rows):
        def score(completion: str, reference=reference) -> float:
            extracted = scoring.extract(completion, how_extract) if math or spec.extract != "auto" else completion
            return float(scoring.match(extracted, reference, spec.match))

        items.append(EvalItem(i, question, reference, score, shots))
    return items
