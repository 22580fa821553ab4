"""Training data: prompt sources for on-policy training and a text/response source for baselines.

Every source becomes a list of ``Sample``s (token ids) once, up front; ``SampleStream`` then walks it
in a deterministic order (a fresh permutation per epoch from ``(seed, epoch)``) and its position
``(epoch, index)`` is part of the training checkpoint, so a resumed run sees exactly the prompts an
uninterrupted run would have seen.

Sources (``DataConfig.source``):

* ``jsonl_chat``: one JSON object per line with ``"messages"`` (chat turns; a trailing assistant turn
  is dropped: on-policy training keeps only prompts) or ``"prompt"`` (a string, sent as one user
  turn). The HF tokenizer's chat template is applied with ``add_generation_prompt=True``.
* ``reasoning_gym``: questions from ``reasoning_gym.create_dataset(name, size, seed)`` for each name
  in ``gym_datasets``, as user turns through the chat template.
* ``text`` (MDLM baseline): ``{"messages": [..., assistant]}`` or ``{"prompt", "response"}`` records
  (prompt through the chat template, response tokens + EOS), or ``{"text": ...}`` (the first token is
  the prompt, the rest the response).
* ``token_ids``: pre-tokenised ``{"prompt_ids": [...], "response_ids": [...]}`` (no tokenizer needed).

Prompts are never cut: one longer than ``max_prompt_tokens`` is skipped and counted
(``data.long_prompts="skip"``, reported as ``data/skipped_long_prompts``) or stops the run with its
location (``"error"``). Chat templates get ``enable_thinking`` (Qwen3's templates think unless told not
to; the paper's students answer without thinking).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..runtime.distributed import global_rank
from .config import DataConfig

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training example as token ids; ``response_ids`` only for off-policy (text) sources."""

    prompt_ids: List[int]
    response_ids: Optional[List[int]] = None
    where: Optional[str] = field(default=None, compare=False)  # "file:line" / "dataset[i]", for messages


class SampleList(list):
    """The samples of a source, with how many prompts were skipped for being too long."""

    skipped_long_prompts: int = 0


class LongPromptError(ValueError):
    """A prompt longer than ``data.max_prompt_tokens`` with ``data.long_prompts="error"``."""


# ------------------------------------------------------------------------------- tokenizing
def load_tokenizer(path: Optional[str]):
    """An HF tokenizer from a local directory (never from the hub)."""
    from transformers import AutoTokenizer

    if not path:
        raise FileNotFoundError("no tokenizer directory: set model.tokenizer (or a student checkpoint with tokenizer/)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _ids(encoded: Any) -> List[int]:
    # transformers returns a list, or a BatchEncoding/dict when it defaults to return_dict=True
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def chat_prompt_ids(tokenizer, messages: Sequence[dict], system_prompt: Optional[str] = None,
                    enable_thinking: bool = False) -> List[int]:
    """Token ids of ``messages`` through the chat template, ending with the assistant header.

    ``enable_thinking`` goes to the template (Qwen3 templates open a thinking section unless it is
    False; templates that do not use it ignore it)."""
    messages = list(messages)
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; use a chat tokenizer or data.source 'token_ids'")
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              enable_thinking=enable_thinking))


def read_jsonl(path: str) -> List[tuple]:
    """``(line number, record)`` for every non-blank line of a JSONL file of objects; a missing file,
    a line that is not a JSON object or a file without records raises with the file and line named."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append((line_no, record))
    if not records:
        raise ValueError(f"{path} is empty")
    return records


def _prompt_messages(record: dict, where: str) -> List[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError(f"{where}: no prompt turns left after dropping the assistant answer")
        return messages
    if "prompt" in record:
        return [{"role": "user", "content": str(record["prompt"])}]
    raise ValueError(f"{where}: record needs 'messages' or 'prompt', has keys {sorted(record)}")


def _keep(samples: SampleList, sample: Sample, cfg: DataConfig, where: str) -> None:
    """Appends ``sample`` unless its prompt is too long (then skips and counts it, or raises)."""
    if not sample.prompt_ids:
        raise ValueError(f"{where}: empty prompt")
    if len(sample.prompt_ids) > cfg.max_prompt_tokens:
        if cfg.long_prompts == "error":
            raise LongPromptError(f"{where}: prompt of {len(sample.prompt_ids)} tokens is longer than "
                                  f"data.max_prompt_tokens {cfg.max_prompt_tokens} (data.long_prompts=skip drops such prompts)")
        samples.skipped_long_prompts += 1
        return
    sample.where = where
    samples.append(sample)


def check_token_ids(samples: Sequence[Sample], vocab_size: int, mask_token_id: Optional[int]) -> None:
    """Raises ValueError naming the first sample (by its file line) holding a token id outside
    ``[0, vocab_size)`` or the ``[MASK]`` id, before any rollout sees it."""
    for number, sample in enumerate(samples):
        for part, ids in (("prompt", sample.prompt_ids), ("response", sample.response_ids or [])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            where = sample.where or f"sample {number}"
            if bad:
                raise ValueError(f"{where}: {part} token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
            if mask_token_id is not None and mask_token_id in ids:
                raise ValueError(f"{where}: {part} contains the [MASK] token id {mask_token_id}")


def jsonl_chat_prompts(cfg: DataConfig, tokenizer) -> SampleList:
    samples = SampleList()
    for line_no, record in read_jsonl(cfg.path):
        where = f"{cfg.path}:{line_no}"
        ids = chat_prompt_ids(tokenizer, _prompt_messages(record, where), cfg.system_prompt, cfg.enable_thinking)
        _keep(samples, Sample(ids), cfg, where)
    return samples


def reasoning_gym_prompts(cfg: DataConfig, tokenizer) -> SampleList:
    """Prompts of reasoning-gym datasets and of this project's families (``families.py``, ``opdlm/...``)."""
    from .families import create_dataset

    if not cfg.gym_datasets:
        raise ValueError("data.gym_datasets is empty")
    samples = SampleList()
    for offset, name in enumerate(cfg.gym_datasets):
        try:
            dataset = create_dataset(name, size=cfg.gym_size, seed=cfg.seed + offset,
                                     **(cfg.gym_options or {}).get(name, {}))
        except Exception as e:  # reasoning_gym raises a bare error for unknown names
            raise ValueError(f"reasoning_gym dataset {name!r} could not be created: {e}") from e
        for i in range(len(dataset)):
            question = dataset[i]["question"]
            ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": question}], cfg.system_prompt,
                                  cfg.enable_thinking)
            _keep(samples, Sample(ids), cfg, f"{name}[{i}]")
    return samples


def text_samples(cfg: DataConfig, tokenizer, eos_token_id: Optional[int]) -> SampleList:
    samples = SampleList()
    for line_no, record in read_jsonl(cfg.path):
        where = f"{cfg.path}:{line_no}"
        if "text" in record:
            ids = _ids(tokenizer(str(record["text"]), add_special_tokens=False))
            if len(ids) < 2:
                raise ValueError(f"{where}: 'text' needs at least 2 tokens")
            prompt, response = ids[:1], ids[1:]
        else:
            if "messages" in record:
                messages = record["messages"]
                if not messages or messages[-1].get("role") != "assistant":
                    raise ValueError(f"{where}: 'messages' must end with an assistant turn for the text source")
                answer = messages[-1]["content"]
            elif "response" in record:
                answer = record["response"]
            else:
                raise ValueError(f"{where}: text record needs 'text', 'messages' or 'prompt'+'response'")
            prompt = chat_prompt_ids(tokenizer, _prompt_messages(record, where), cfg.system_prompt,
                                     cfg.enable_thinking)
            response = _ids(tokenizer(str(answer), add_special_tokens=False))
            if eos_token_id is not None:
                response = response + [eos_token_id]
        _keep(samples, Sample(prompt, response[: cfg.max_response_tokens]), cfg, where)
    return samples


def token_id_samples(cfg: DataConfig) -> SampleList:
    samples = SampleList()
    for line_no, record in read_jsonl(cfg.path):
        where = f"{cfg.path}:{line_no}"
        if "prompt_ids" not in record:
            raise ValueError(f"{where}: record needs 'prompt_ids'")
        prompt = [int(t) for t in record["prompt_ids"]]
        response = record.get("response_ids")
        response = None if response is None else [int(t) for t in response][: cfg.max_response_tokens]
        _keep(samples, Sample(prompt, response), cfg, where)
    return samples


def load_samples(cfg: DataConfig, tokenizer=None, eos_token_id: Optional[int] = None) -> SampleList:
    """All samples of the configured source, tokenised (a ``SampleList``: a list that also counts
    the prompts skipped for being longer than ``max_prompt_tokens``, said once on the console)."""
    if cfg.source == "token_ids":
        samples = token_id_samples(cfg)
    elif tokenizer is None:
        raise ValueError(f"data.source {cfg.source!r} needs a tokenizer (model.tokenizer)")
    elif cfg.source == "jsonl_chat":
        samples = jsonl_chat_prompts(cfg, tokenizer)
    elif cfg.source == "reasoning_gym":
        samples = reasoning_gym_prompts(cfg, tokenizer)
    elif cfg.source == "text":
        samples = text_samples(cfg, tokenizer, eos_token_id)
    else:
        raise ValueError(f"unknown data.source {cfg.source!r}")
    if samples.skipped_long_prompts and global_rank() == 0:
        logger.warning("%d of %d prompts are longer than data.max_prompt_tokens=%d and were skipped "
                       "(data.long_prompts=skip; 'error' stops at the first)", samples.skipped_long_prompts,
                       samples.skipped_long_prompts + len(samples), cfg.max_prompt_tokens)
    return samples


# --------------------------------------------------------------------------------- ordering
class SampleStream:
    """Deterministic, resumable walk over ``samples``: epoch ``e`` visits them in the permutation
    drawn from ``(seed, e)`` (identity when not shuffling)."""

    def __init__(self, samples: Sequence[Sample], seed: int, shuffle: bool = True) -> None:
        if not samples:
            raise ValueError("the data source produced no samples")
        self.samples = list(samples)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.samples), generator=g).tolist()

    def next_indices(self, n: int) -> List[int]:
        """Indices (into ``samples``) of the next ``n`` samples, rolling over into the next epoch."""
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def next_batch(self, n: int) -> List[Sample]:
        """The next ``n`` samples, rolling over into the next epoch when this one runs out."""
        return [self.samples[i] for i in self.next_indices(n)]

    @property
    def epochs_done(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.epoch + self.index / len(self.samples)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "num_samples": len(self.samples)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["num_samples"] != len(self.samples):
            raise ValueError(
                f"the checkpoint's data position is for {state['num_samples']} samples, but the data "
                f"source now has {len(self.samples)}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
