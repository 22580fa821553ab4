"""The ``data`` section of a training config: where prompts (or, for ``mdlm``, texts and responses) come
from, and how they are cut and ordered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config.checks import one_of, positive_int

DATA_SOURCES = ("jsonl_chat", "reasoning_gym", "text", "token_ids")
LONG_PROMPT_POLICIES = ("skip", "error")


@dataclass
class DataConfig:
    """Prompt (or, for ``mdlm``, text/response) source; see ``data/samples.py``."""

    source: str = "jsonl_chat"
    path: Optional[str] = None  # jsonl_chat / text / token_ids
    # reasoning-gym datasets and this project's families (data/families.py: "opdlm/copy_sentence", ...)
    gym_datasets: List[str] = field(default_factory=lambda: ["basic_arithmetic"])
    gym_size: int = 1000
    # per-dataset reasoning-gym options (difficulty), e.g. {"basic_arithmetic": {"max_terms": 2}}
    gym_options: dict = field(default_factory=dict)
    max_prompt_tokens: int = 512
    # a prompt longer than max_prompt_tokens is never cut: "skip" drops it (said once on the console and
    # counted as data/skipped_long_prompts), "error" stops with the prompt's location
    long_prompts: str = "skip"
    max_response_tokens: int = 512  # text / mdlm: answer part cropped to this many tokens
    shuffle: bool = True
    seed: int = 1234
    epochs: float = 1.0  # passes over the data (paper: 1; OPDLM-MATH: 10); sets the steps unless train.steps does
    system_prompt: Optional[str] = None
    # Qwen3-style templates think by default; the paper's students answer without thinking
    enable_thinking: bool = False

    def __post_init__(self) -> None:
        one_of("data.source", self.source, DATA_SOURCES)
        one_of("data.long_prompts", self.long_prompts, LONG_PROMPT_POLICIES)
        positive_int("data.max_prompt_tokens", self.max_prompt_tokens)
        if not isinstance(self.epochs, (int, float)) or isinstance(self.epochs, bool) or self.epochs <= 0:
            raise ValueError(f"data.epochs must be a positive number, got {self.epochs!r}")
