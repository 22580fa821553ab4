"""Where the answers x0 of a rollout come from (``Objective.answers``), as one global batch.

Every rank draws the same ``tasks_per_rollout`` samples; the work of producing their answers is split
over the data-parallel ranks (rank d takes rows ``[d T/DP, (d+1) T/DP)``) and the results are
gathered, so every rank holds the whole rollout (token ids and commit rounds: small). Sampling noise
is keyed by the global row (``DecodeConfig.row_offset``), so a rollout does not depend on the
data-parallel size.

* ``StudentRollouts`` - the student's block-diffusion rollouts at the curriculum's length (``opd``,
  ``opd_off``); one length for all ranks (from the longest prompt of the whole rollout).
* ``TeacherAnswers`` - one answer of the frozen teacher per prompt, decoded autoregressively once
  and cached in ``<run_dir>/teacher_answers.jsonl`` (``sft``, ``kd_off``); a later epoch or a
  resumed run reads the cache.
* ``DatasetAnswers`` - the responses of the training data (``mdlm``, ``ar``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config.model import ModelConfig
from ..data.samples import Sample
from ..rollout.config import DecodeConfig, whole_blocks
from ..rollout.types import RolloutResult
from ..runtime.distributed import data_parallel_share

logger = logging.getLogger(__name__)

# rollout_fn(model, config, prompts, decode) -> RolloutResult; the default is the KV-cached engine
RolloutFn = Callable[[torch.nn.Module, ModelConfig, List[List[int]], DecodeConfig], RolloutResult]

TEACHER_ANSWERS_FILE = "teacher_answers.jsonl"


def engine_rollout(model, config: ModelConfig, prompts: List[List[int]], decode: DecodeConfig) -> RolloutResult:
    """Decodes ``prompts`` with the block-diffusion rollout engine (KV cache, TP/PP aware)."""
    from ..rollout.engine import DiffusionRolloutEngine

    return DiffusionRolloutEngine(model, config).generate(prompts, decode)


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from integers (deterministic, layout independent)."""
    value = 0x9E3779B1
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x7F4A7C15) % (2**61 - 1)
    return value % (2**31 - 1)


def gather_over_data_parallel(result: RolloutResult, pad_token_id: int) -> RolloutResult:
    """The rows of every data-parallel rank's ``result``, in rank order, on every rank."""
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return result
    parts: List[Optional[Dict[str, torch.Tensor]]] = [None] * size
    dist.all_gather_object(parts, result.tensors(), group=parallel_state.get_data_parallel_group())
    return RolloutResult.concat([RolloutResult.from_tensors(p) for p in parts if p is not None], pad_token_id)


def results_from_answers(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                         finished: Sequence[bool], pad_token_id: int) -> RolloutResult:
    """(prompt, answer) pairs in the rollout layout (left-padded prompts, right-padded answers).
    Answers decoded token by token: answer token i was committed at round i."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    bsz = len(prompts)
    plen = max(len(p) for p in prompts)
    alen = max([len(a) for a in answers] + [0])
    prompt_ids = torch.full((bsz, plen), pad_token_id, dtype=torch.long)
    prompt_valid = torch.zeros((bsz, plen), dtype=torch.bool)
    answer_ids = torch.full((bsz, alen), pad_token_id, dtype=torch.long)
    answer_valid = torch.zeros((bsz, alen), dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        prompt_ids[i, plen - len(p):] = torch.tensor(list(p), dtype=torch.long)
        prompt_valid[i, plen - len(p):] = True
        if len(a):
            answer_ids[i, :len(a)] = torch.tensor(list(a), dtype=torch.long)
            answer_valid[i, :len(a)] = True
    commit = torch.where(answer_valid, torch.arange(alen)[None].expand(bsz, -1), torch.full_like(answer_ids, -1))
    return RolloutResult(prompt_ids=prompt_ids, prompt_valid=prompt_valid, answer_ids=answer_ids,
                         answer_valid=answer_valid, commit_step=commit, num_rounds=answer_valid.sum(-1),
                         finished=torch.tensor(list(finished), dtype=torch.bool), num_forward_passes=0)


class DatasetAnswers:
    """The training data's own responses."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def produce(self, samples: Sequence[Sample], sample_ids: Sequence[int], rollout: int) -> Tuple[RolloutResult, int]:
        if any(not s.response_ids for s in samples):
            raise ValueError("this objective trains on the dataset's responses, and a sample has none "
                             "(data.source 'text' or 'token_ids' with responses)")
        result = results_from_answers([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                      [True] * len(samples), self.pad_token_id)
        return result, -1


class StudentRollouts:
    """The student's own rollouts at the curriculum's length for rollout ``r``."""

    def __init__(self, student, config: ModelConfig, decode: Callable[[int, int], DecodeConfig],
                 length: Callable[[int], int], rollout_fn: RolloutFn) -> None:
        self.student = student
        self.config = config
        self.decode = decode  # (rollout, max_new_tokens) -> DecodeConfig
        self.length = length  # rollout -> curriculum length
        self.rollout_fn = rollout_fn

    def generation_length(self, rollout: int, samples: Sequence[Sample]) -> int:
        longest = max(len(s.prompt_ids) for s in samples)
        room = self.config.max_sequence_length - longest
        if room < 1:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for an answer within "
                             f"max_sequence_length {self.config.max_sequence_length}")
        return whole_blocks(max(1, min(self.length(rollout), room)), self.config.block_size)

    def produce(self, samples: Sequence[Sample], sample_ids: Sequence[int], rollout: int) -> Tuple[RolloutResult, int]:
        length = self.generation_length(rollout, samples)
        start, end = data_parallel_share(len(samples))
        decode = self.decode(rollout, length)
        decode.row_offset = start
        self.student.eval()
        try:
            with torch.no_grad():
                mine = self.rollout_fn(self.student, self.config, [list(s.prompt_ids) for s in samples[start:end]],
                                       decode)
        finally:
            self.student.train()
        return gather_over_data_parallel(mine, self.config.pad_token_id or 0), length


class TeacherAnswers:
    """One offline answer of the frozen teacher per prompt, decoded once and cached on disk.

    The teacher decodes autoregressively (block size 1 with the AR logit shift), greedily unless
    ``temperature`` > 0 (then keyed by the sample's index, so the cache does not depend on batching).
    """

    def __init__(self, teacher, max_new_tokens: int, temperature: float, seed: int, end_of_turn_ids: Sequence[int],
                 cache_dir: str, rollout_fn: RolloutFn, is_writer: bool) -> None:
        from ..model.build import uses_causal_kernel

        if uses_causal_kernel(teacher.model):  # the KV-cached engine hands it masks over the cache
            raise ValueError("decoding teacher answers needs a teacher built with the arbitrary mask, not the causal kernel")
        self.teacher = teacher
        self.config = teacher.config.replace(block_size=1, logit_shift=True)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.end_of_turn_ids = list(end_of_turn_ids)
        self.path = os.path.join(cache_dir, TEACHER_ANSWERS_FILE)
        self.rollout_fn = rollout_fn
        self.is_writer = is_writer
        self.cache: Dict[int, Tuple[List[int], bool]] = self._read()

    def _read(self) -> Dict[int, Tuple[List[int], bool]]:
        cache: Dict[int, Tuple[List[int], bool]] = {}
        if not os.path.isfile(self.path):
            return cache
        with open(self.path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    cache[int(record["sample"])] = ([int(t) for t in record["answer_ids"]], bool(record["finished"]))
                except (ValueError, KeyError, TypeError):
                    # a line cut by a crash mid-write: that answer is decoded again
                    logger.warning("%s:%d is not a complete teacher answer; it will be regenerated", self.path, number)
        return cache

    def _decode(self, prompts: List[List[int]], sample_ids: List[int]) -> List[Tuple[List[int], bool]]:
        longest = max(len(p) for p in prompts)
        room = self.config.max_sequence_length - longest
        if room < 1:
            raise ValueError(f"a prompt of {longest} tokens leaves the teacher no room to answer within "
                             f"max_sequence_length {self.config.max_sequence_length}")

        def decode(batch: List[List[int]], seed: int):
            config = DecodeConfig(max_new_tokens=min(self.max_new_tokens, room), block_size=1, threshold=1.0,
                                  temperature=self.temperature, seed=seed, eos_token_ids=self.end_of_turn_ids or None)
            with torch.no_grad():
                result = self.rollout_fn(self.teacher.model, self.config, batch, config)
            return list(zip(result.completions(), (bool(x) for x in result.finished.tolist())))

        if self.temperature == 0:  # greedy answers do not depend on the batch: decode them together
            return decode(prompts, 0)
        # sampled: one prompt per call, the noise keyed by the sample (not by its place in a batch)
        return [decode([p], mix_seed(self.seed, sample, 3))[0] for p, sample in zip(prompts, sample_ids)]

    def produce(self, samples: Sequence[Sample], sample_ids: Sequence[int], rollout: int) -> Tuple[RolloutResult, int]:
        from megatron.core import parallel_state

        missing = sorted({int(i) for i in sample_ids if int(i) not in self.cache})
        if missing:
            by_id = {int(i): s for i, s in zip(sample_ids, samples)}
            start, end = data_parallel_share(len(missing))
            mine = missing[start:end]
            decoded = self._decode([list(by_id[i].prompt_ids) for i in mine], mine) if mine else []
            new = list(zip(mine, decoded))
            if parallel_state.get_data_parallel_world_size() > 1:
                parts: List[Optional[list]] = [None] * parallel_state.get_data_parallel_world_size()
                dist.all_gather_object(parts, new, group=parallel_state.get_data_parallel_group())
                new = [item for part in parts for item in (part or [])]
            for sample, answer in new:
                self.cache[sample] = answer
            if self.is_writer:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with open(self.path, "a") as f:
                    for sample, (ids, done) in new:
                        f.write(json.dumps({"sample": sample, "answer_ids": ids, "finished": done}) + "\n")
        answers = [self.cache[int(i)] for i in sample_ids]
        result = results_from_answers([s.prompt_ids for s in samples], [a[0] for a in answers],
                                      [a[1] for a in answers], self.config.pad_token_id or 0)
        return result, self.max_new_tokens
