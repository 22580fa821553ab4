"""What a rollout returns: the contract between the rollout engine and the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

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
