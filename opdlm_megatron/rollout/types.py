"""What a rollout returns: the contract between the rollout engine and the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor


@dataclass
class RolloutResult:
    """Batched student trajectories, on CPU, identical on every rank.

    * ``prompt_ids`` / ``prompt_valid`` ``[B, P]``: prompts, left-padded.
    * ``answer_ids`` ``[B, A]``: the completed answer x0 (right-padded; includes the EOS token that
      ended the sequence, if any).
    * ``answer_valid`` ``[B, A]``: real answer tokens.
    * ``commit_step`` ``[B, A]``: the denoising round (0-based, counted over the whole answer, so it
      increases from block to block) at which each token was committed; -1 on padding. The state
      before round ``s`` is ``where(commit_step < s, x0, [MASK])``, which is all the trainer needs
      to rebuild any intermediate state.
    * ``num_rounds`` ``[B]``: denoising rounds used by each sequence (= max commit_step + 1).
    * ``finished`` ``[B]``: ended by EOS / end-of-turn rather than by ``max_new_tokens``.
    * ``num_forward_passes``: model forwards the engine ran for the whole batch.
    """

    prompt_ids: Tensor
    prompt_valid: Tensor
    answer_ids: Tensor
    answer_valid: Tensor
    commit_step: Tensor
    num_rounds: Tensor
    finished: Tensor
    num_forward_passes: int

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def answer_lengths(self) -> Tensor:
        return self.answer_valid.sum(-1)

    def completions(self) -> List[List[int]]:
        return [row[valid].tolist() for row, valid in zip(self.answer_ids, self.answer_valid)]

    def state_before_round(self, round_index: Tensor, mask_token_id: int) -> Tensor:
        """xt ``[B, A]``: the answer as it stood before round ``round_index`` ``[B]`` (or ``[B, A]``)."""
        if round_index.dim() == 1:
            round_index = round_index[:, None]
        revealed = (self.commit_step < round_index) & self.answer_valid
        return torch.where(revealed, self.answer_ids, torch.full_like(self.answer_ids, mask_token_id))

    def rows(self, index: Tensor, trim: bool = True) -> "RolloutResult":
        """The rows ``index`` (long tensor), with answer and prompt padding trimmed to what those
        rows need when ``trim``. ``num_forward_passes`` is kept (it describes the whole batch)."""
        index = index.to(torch.long)
        prompt_valid, answer_valid = self.prompt_valid[index], self.answer_valid[index]
        p0, a1 = 0, answer_valid.shape[1]
        if trim and index.numel():
            p0 = prompt_valid.shape[1] - int(prompt_valid.sum(-1).max())
            a1 = int(answer_valid.sum(-1).max())
        return RolloutResult(
            prompt_ids=self.prompt_ids[index, p0:], prompt_valid=prompt_valid[:, p0:],
            answer_ids=self.answer_ids[index, :a1], answer_valid=answer_valid[:, :a1],
            commit_step=self.commit_step[index, :a1], num_rounds=self.num_rounds[index],
            finished=self.finished[index], num_forward_passes=self.num_forward_passes,
        )

    @staticmethod
    def concat(results: List["RolloutResult"], pad_token_id: int = 0) -> "RolloutResult":
        """Rows of several results in order, re-padded (prompts on the left, answers on the right);
        ``num_forward_passes`` is summed."""
        if not results:
            raise ValueError("concat needs at least one RolloutResult")
        plen = max(r.prompt_ids.shape[1] for r in results)
        alen = max(r.answer_ids.shape[1] for r in results)

        def left(x: Tensor, width: int, value) -> Tensor:
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x: Tensor, width: int, value) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return RolloutResult(
            prompt_ids=torch.cat([left(r.prompt_ids, plen, pad_token_id) for r in results]),
            prompt_valid=torch.cat([left(r.prompt_valid, plen, False) for r in results]),
            answer_ids=torch.cat([right(r.answer_ids, alen, pad_token_id) for r in results]),
            answer_valid=torch.cat([right(r.answer_valid, alen, False) for r in results]),
            commit_step=torch.cat([right(r.commit_step, alen, -1) for r in results]),
            num_rounds=torch.cat([r.num_rounds for r in results]),
            finished=torch.cat([r.finished for r in results]),
            num_forward_passes=sum(int(r.num_forward_passes) for r in results),
        )

    def tensors(self) -> Dict[str, Tensor]:
        """The result as named tensors (for safetensors files); ``from_tensors`` inverts it."""
        out = {name: getattr(self, name).contiguous() for name in _TENSOR_FIELDS}
        out["num_forward_passes"] = torch.tensor([int(self.num_forward_passes)], dtype=torch.long)
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, Tensor]) -> "RolloutResult":
        missing = [n for n in (*_TENSOR_FIELDS, "num_forward_passes") if n not in tensors]
        if missing:
            raise ValueError(f"a stored rollout result lacks {missing}")
        return cls(**{n: tensors[n] for n in _TENSOR_FIELDS},
                   num_forward_passes=int(tensors["num_forward_passes"][0]))


_TENSOR_FIELDS = ("prompt_ids", "prompt_valid", "answer_ids", "answer_valid", "commit_step", "num_rounds", "finished")
