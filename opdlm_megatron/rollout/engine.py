"""Block-diffusion decoding of the student with a KV cache, under tensor and pipeline parallelism.

Sequence columns (shared by every row of a batch): ``[prompt (left-padded to P) | answer (A)]``;
answer block j of every row lives at columns ``P + j*b ... P + (j+1)*b``. Positions and block ids
follow ``masks.block_causal_layout(valid, b, prompt_lengths)``: the prompt is tiled from its start
and the answer starts a fresh block.

Each forward's queries are ``[pending | current block]``: *pending* is the clean text whose keys
are not cached yet (the prompt on the first forward, the block a row just finished on the first
step of its next block; empty otherwise), so a finished block's keys are written by folding it into
the next block's first step rather than by an extra forward. Keys are the cached columns followed
by the queries; the mask is the block-causal rule over ``cat(cached layout, query layout)``.

With ``logit_shift`` the prediction for answer slot i comes from the output at column i-1, as in
``masks.opd_training_batch``: inside a block from the previous slot; for a block's first slot
from the last pending token, whose (block-causal, hence final) output is kept for the block's
later steps.

Each forward runs through ``FusedDecodeForward`` (an inference-only forward over the model's own
parameters, ``fused_forward.py``) when it supports the model, else through megatron's forward;
``forward_impl`` chooses, and both give the same tokens (tests). A model built with sequence
parallelism decodes outside it (``sequence_parallel_disabled``): a step's few columns need not split
over the TP ranks, and the same weights give the same tokens with SP off (tests/test_rollout_parallel.py).

Rows advance at their own pace (a row's block may finish in one step while another's needs four);
finished rows leave the batch (their cache rows are dropped), so they stop costing compute.

Expert parallelism: the ranks of an EP group decode their own prompts, and every forward of an MoE
model exchanges tokens among them, so a rank whose rows have all ended forwards an idle pad token
while the others still decode (``model/expert_parallel.py``; one all-reduce of a flag per step).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config.model import ModelConfig
from ..config.precision import fp8_disabled
from ..model import masks
from ..model.build import attention_mask, mask_unused_vocab, sequence_parallel_disabled
from ..model.expert_parallel import ExpertParallelLockstep, idle_row
from .config import DecodeConfig
from .fused_forward import FusedDecodeForward, unsupported_reason
from .kv_cache import BlockKVCache
from .pipeline import StageRunner
from .sampling import choose_tokens, entropy, select_commits, slot_keys
from .types import RolloutResult

logger = logging.getLogger(__name__)

FORWARD_IMPLS = ("auto", "fused", "megatron")


def _gather_layout(layout: masks.AttentionLayout, columns: Tensor, valid: Tensor) -> masks.AttentionLayout:
    return masks.AttentionLayout(
        block_ids=layout.block_ids.gather(1, columns),
        noisy=torch.zeros_like(valid),
        valid=valid,
        position_ids=layout.position_ids.gather(1, columns),
    )


@dataclass
class _Rows:
    """Decoding state of the active rows (identical on every rank)."""

    ids: Tensor  # [R] index of the prompt in the caller's batch
    tokens: Tensor  # [R, P + A] prompt + answer, [MASK] where not committed
    layout: masks.AttentionLayout  # [R, P + A] positions / block ids of every column
    written: Tensor  # [R, P + A] columns whose keys are cached
    commit_step: Tensor  # [R, A]
    block: Tensor  # [R] current answer block
    step_in_block: Tensor  # [R]
    rounds: Tensor  # [R] denoising rounds used so far
    pending: Tensor  # [R] the previous block (or the prompt) still has to be cached
    boundary: Optional[Tensor] = None  # [R, V/TP] logit-shift prediction for slot 0 (last stage)

    def select(self, keep: Tensor) -> "_Rows":
        return _Rows(
            self.ids[keep], self.tokens[keep], self.layout.rows(keep), self.written[keep], self.commit_step[keep],
            self.block[keep], self.step_in_block[keep], self.rounds[keep], self.pending[keep],
            None if self.boundary is None else self.boundary[keep],
        )


class DiffusionRolloutEngine:
    """Decodes answers with a megatron-core student (``model.build_model``) at any TP/PP layout.

    ``generate`` is collective: every rank of a model-parallel group calls it with the same prompts
    and gets the same ``RolloutResult``.
    """

    def __init__(self, model, config: ModelConfig, forward_impl: str = "auto") -> None:
        """``forward_impl``: ``"fused"`` decodes through ``FusedDecodeForward`` (an inference-only
        forward over the same parameters, ~2x cheaper per forward on CPU), ``"megatron"`` through the
        model's own forward, ``"auto"`` the fused one when it supports the model (else megatron's)."""
        if forward_impl not in FORWARD_IMPLS:
            raise ValueError(f"forward_impl must be one of {FORWARD_IMPLS}, got {forward_impl!r}")
        self.model = model
        self.config = config
        with sequence_parallel_disabled(model):  # decoding runs outside sequence parallelism (generate)
            self.forward_reason = (unsupported_reason(model) if forward_impl != "megatron"
                                   else "forward_impl='megatron'")
            if forward_impl == "fused" and self.forward_reason is not None:
                raise ValueError(f"forward_impl='fused' cannot run this model: {self.forward_reason}")
            fused = FusedDecodeForward(model) if self.forward_reason is None else None
        if fused is None and forward_impl == "auto":
            logger.info("rollout engine: megatron forward (the fused one does not support %s)", self.forward_reason)
        self.forward_impl = "fused" if fused is not None else "megatron"
        self.runner = StageRunner(model, fused)
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------ checks
    def _check_prompts(self, prompts: Sequence[Sequence[int]], decode: DecodeConfig) -> None:
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        limit = self.config.max_sequence_length
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(prompt) + decode.max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} is too long: {len(prompt)} tokens + max_new_tokens {decode.max_new_tokens} "
                    f"exceeds the model's max_sequence_length {limit}"
                )
            if self.config.mask_token_id in prompt:
                raise ValueError(f"prompt {i} contains the [MASK] token id {self.config.mask_token_id}")
            bad = [int(t) for t in prompt if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.config.vocab_size}): {bad[:5]}")

    # ---------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], decode: Optional[DecodeConfig] = None) -> RolloutResult:
        """Decodes one answer per prompt (token-id lists of any lengths); see ``RolloutResult``."""
        decode = (decode or DecodeConfig()).resolved(self.config.block_size, self.config.eos_token_ids)
        self._check_prompts(prompts, decode)
        was_training = self.model.training
        self.model.eval()
        try:
            # rounds of a few tokens are not FP8 GEMM shapes (precision.py), and need not split over
            # the TP ranks along the sequence: decoding runs outside FP8 and sequence parallelism
            with fp8_disabled(self.model), sequence_parallel_disabled(self.model):
                return self._generate(prompts, decode)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts: Sequence[Sequence[int]], decode: DecodeConfig) -> RolloutResult:
        cfg, dev = self.config, self.device
        b, A = decode.block_size, decode.max_new_tokens
        n_blocks = A // b
        mask_id = cfg.mask_token_id
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        batch = len(prompts)
        P = max(len(p) for p in prompts)

        prompt_ids = torch.full((batch, P), pad_id, dtype=torch.long)
        prompt_valid = torch.zeros((batch, P), dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            prompt_ids[i, P - len(prompt):] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
            prompt_valid[i, P - len(prompt):] = True
        prompt_lengths = prompt_valid.sum(-1)

        all_valid = torch.cat([prompt_valid, torch.ones(batch, A, dtype=torch.bool)], 1)
        rows = _Rows(
            ids=torch.arange(batch, device=dev),
            tokens=torch.cat([prompt_ids, torch.full((batch, A), mask_id, dtype=torch.long)], 1).to(dev),
            layout=masks.block_causal_layout(all_valid, b, prompt_lengths).to(dev),
            written=torch.zeros(batch, P + A, dtype=torch.bool, device=dev),
            commit_step=torch.full((batch, A), -1, dtype=torch.long, device=dev),
            block=torch.zeros(batch, dtype=torch.long, device=dev),
            step_in_block=torch.zeros(batch, dtype=torch.long, device=dev),
            rounds=torch.zeros(batch, dtype=torch.long, device=dev),
            pending=torch.ones(batch, dtype=torch.bool, device=dev),
        )
        out = dict(
            answer=torch.full((batch, A), pad_id, dtype=torch.long),
            commit=torch.full((batch, A), -1, dtype=torch.long),
            valid=torch.zeros((batch, A), dtype=torch.bool),
            finished=torch.zeros(batch, dtype=torch.bool),
            rounds=torch.zeros(batch, dtype=torch.long),
        )
        eos = torch.tensor(decode.eos_token_ids, dtype=torch.long, device=dev)
        slot = torch.arange(b, device=dev)

        cache = BlockKVCache(self.model, P + A, hooks=self.runner.fused is None) if decode.use_cache else None
        forwards = 0
        prefill = True
        lockstep = ExpertParallelLockstep()
        with cache if cache is not None else contextlib.nullcontext():
            while lockstep.still_decoding(rows.ids.numel() > 0):
                if rows.ids.numel() == 0:  # this rank is done, another rank of its EP group is not
                    if cache is not None:
                        cache.release()
                    self._idle_forward(pad_id)
                    continue
                R = rows.ids.numel()
                current_cols = P + rows.block[:, None] * b + slot  # [R, b]
                if cache is not None:
                    logits_pred, pend_cols, pend_valid = self._cached_forward(rows, cache, current_cols, prefill, P, b)
                else:
                    logits_pred, pend_cols, pend_valid = self._full_forward(rows, current_cols)
                forwards += 1

                # -------- the last stage decides, every stage learns the decision
                decision = None
                if self.runner.is_last:
                    decision = self._decide(rows, logits_pred, current_cols, decode, P)
                decision = self.runner.broadcast_from_last_stage(decision, (2, R, b), torch.long, dev)
                chosen, commit = decision[0], decision[1].bool()

                if cache is not None:
                    cache.commit(torch.arange(pend_cols.shape[1], device=dev), pend_cols, pend_valid)
                    rows.written.scatter_(1, pend_cols, pend_valid | rows.written.gather(1, pend_cols))
                prefill = False
                rows.pending.zero_()

                row_done = self._apply_commits(rows, chosen, commit, current_cols, P, n_blocks, eos)
                if bool(row_done.any()):
                    done = row_done.nonzero(as_tuple=True)[0]
                    self._finalize(rows, done, eos, P, b, pad_id, out)
                    keep = (~row_done).nonzero(as_tuple=True)[0]
                    rows = rows.select(keep)
                    if cache is not None:
                        cache.select_rows(keep)

        length = int(out["valid"].sum(-1).max())
        return RolloutResult(
            prompt_ids=prompt_ids, prompt_valid=prompt_valid,
            answer_ids=out["answer"][:, :length], answer_valid=out["valid"][:, :length],
            commit_step=out["commit"][:, :length], num_rounds=out["rounds"], finished=out["finished"],
            num_forward_passes=forwards,
        )

    def _apply_commits(self, rows: _Rows, chosen: Tensor, commit: Tensor, current_cols: Tensor, P: int,
                       n_blocks: int, eos: Tensor) -> Tensor:
        """Writes the committed tokens and their round, moves rows whose block is complete to the
        next block (its predecessor becomes pending); returns the rows that are done ``[R]``."""
        mask_id = self.config.mask_token_id
        block_tokens = torch.where(commit, chosen, rows.tokens.gather(1, current_cols))
        rows.tokens.scatter_(1, current_cols, block_tokens)
        answer_cols = current_cols - P
        steps = rows.commit_step.gather(1, answer_cols)
        rows.commit_step.scatter_(1, answer_cols, torch.where(commit, rows.rounds[:, None], steps))
        rows.rounds += 1
        rows.step_in_block += 1

        still_masked = block_tokens == mask_id
        block_done = ~still_masked.any(1)
        # A row ends as soon as an EOS is committed and every slot before it is committed: the
        # slots after it would be cut anyway, so denoising them would waste forwards.
        is_eos = torch.isin(block_tokens, eos) if eos.numel() else torch.zeros_like(still_masked)
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(rows.block, block_tokens.shape[1]))
        before_eos = torch.arange(block_tokens.shape[1], device=block_tokens.device)[None] < first_eos[:, None]
        eos_done = is_eos.any(1) & ~(still_masked & before_eos).any(1)
        row_done = eos_done | (block_done & (rows.block + 1 >= n_blocks))
        advance = block_done & ~row_done
        rows.block += advance.long()
        rows.step_in_block = torch.where(advance, torch.zeros_like(rows.step_in_block), rows.step_in_block)
        rows.pending = advance.clone()
        return row_done

    # ------------------------------------------------------------------------------ forwards
    def _cached_forward(self, rows: _Rows, cache: BlockKVCache, current_cols: Tensor, prefill: bool, P: int, b: int):
        R, dev = rows.ids.numel(), current_cols.device
        if prefill:
            pend_cols = torch.arange(P, device=dev).expand(R, P)
            pend_valid = rows.layout.valid[:, :P]
        elif bool(rows.pending.any()):
            pend_valid = rows.pending[:, None].expand(R, b)
            # rows without a pending block reuse their own current columns as (invalid) filler
            pend_cols = torch.where(pend_valid, current_cols - b, current_cols)
        else:
            pend_cols = current_cols[:, :0]
            pend_valid = rows.pending[:, None][:, :0]
        query_cols = torch.cat([pend_cols, current_cols], 1)
        query_valid = torch.cat([pend_valid, torch.ones_like(current_cols, dtype=torch.bool)], 1)
        query_layout = _gather_layout(rows.layout, query_cols, query_valid)

        used = 0 if prefill else int(rows.written.any(0).nonzero().max()) + 1
        cache.used = used
        cached_layout = rows.layout.columns(0, used)
        cached_layout = masks.AttentionLayout(
            cached_layout.block_ids, cached_layout.noisy, rows.written[:, :used], cached_layout.position_ids
        )
        keys_layout = masks.AttentionLayout.cat([cached_layout, query_layout])
        mask = self._mask(query_layout, keys_layout)
        # only the columns that predict the current block's slots go through the output layer: the
        # block itself, or with the logit shift the column before each slot (the last pending one)
        width = pend_cols.shape[1]
        first = max(width - 1, 0) if self.config.logit_shift else width
        columns = torch.arange(first, width + b, device=dev).expand(R, -1)
        logits = self.runner.forward(rows.tokens.gather(1, query_cols), query_layout.position_ids, mask, columns, cache)
        pred = None
        if logits is not None:
            pending_now = pend_valid.any(1) if width else torch.zeros(R, dtype=torch.bool, device=dev)
            pred = self._predictions(rows, logits, width - first, pending_now, b)
        return pred, pend_cols, pend_valid

    def _mask(self, queries: masks.AttentionLayout, keys: Optional[masks.AttentionLayout] = None):
        # the fused forward takes the dense mask whatever the model's attention backend
        return queries.dense_mask(keys) if self.runner.fused is not None else attention_mask(self.config, queries, keys)

    def _idle_forward(self, pad_id: int) -> None:
        """One pad token through every stage, outputs unused: takes part in the MoE layers' token
        exchanges of the EP group (expert parallelism) and changes nothing."""
        ids, layout = idle_row(1, 1, pad_id)
        layout = layout.to(self.device)
        self.runner.forward(ids.to(self.device), layout.position_ids, self._mask(layout))

    def _full_forward(self, rows: _Rows, current_cols: Tensor):
        """Naive baseline: the whole sequence (future blocks [MASK]) under the block-causal mask."""
        layout = rows.layout
        logits = self.runner.forward(rows.tokens, layout.position_ids, self._mask(layout))
        pred = None
        if logits is not None:
            index = current_cols - 1 if self.config.logit_shift else current_cols
            pred = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        empty = current_cols[:, :0]
        return pred, empty, empty.bool()

    def _predictions(self, rows: _Rows, logits: Tensor, width: int, pending_now: Tensor, b: int) -> Tensor:
        """Logit shards ``[R, b, V/TP]`` predicting the current block's slots."""
        vocab = logits.shape[-1]
        if not self.config.logit_shift:
            return logits[:, width:width + b]
        # slot s >= 1 <- output of slot s-1; slot 0 <- last pending token (now or kept from before)
        inner = logits[:, width:width + b - 1]
        if width:
            last_pending = logits[:, width - 1]
            if rows.boundary is None:
                rows.boundary = last_pending.clone()
            else:
                rows.boundary = torch.where(pending_now[:, None], last_pending, rows.boundary)
        if rows.boundary is None:
            raise RuntimeError("logit-shift decoding lost the prediction of the block's first slot")
        return torch.cat([rows.boundary[:, None].to(logits.dtype), inner], 1).reshape(-1, b, vocab)

    # ------------------------------------------------------------------------------ decisions
    def _decide(self, rows: _Rows, logits: Tensor, current_cols: Tensor, decode: DecodeConfig, P: int) -> Tensor:
        """Chosen tokens and commit flags ``[2, R, b]`` (long) on the last stage."""
        R, b, vocab = logits.shape
        masked = rows.tokens.gather(1, current_cols) == self.config.mask_token_id
        flat = mask_unused_vocab(logits.reshape(R * b, vocab), self.config)
        keys = None
        if not decode.greedy:
            answer_pos = current_cols - P
            row_keys = (rows.ids + decode.row_offset)[:, None].expand(R, b).reshape(-1)
            keys = slot_keys(decode.seed, row_keys, answer_pos.reshape(-1), rows.rounds[:, None].expand(R, b).reshape(-1))
        tokens, conf = choose_tokens(flat, decode, keys)
        tokens, conf = tokens.view(R, b), conf.view(R, b)
        entropies = entropy(flat).view(R, b) if decode.rule == "entropy_bounded" else None
        commit = select_commits(conf, masked, rows.step_in_block, decode, entropies)
        return torch.stack([tokens.long(), commit.long()])

    @staticmethod
    def _finalize(rows: _Rows, done: Tensor, eos: Tensor, P: int, b: int, pad_id: int, out: dict) -> None:
        """Copies finished rows into the outputs: answer up to its first EOS (inclusive) or its
        last decoded block; tokens after the EOS are padding (commit step -1)."""
        answer = rows.tokens[done, P:]
        steps = rows.commit_step[done]
        index = torch.arange(answer.shape[1], device=answer.device)[None]
        decoded = index < (rows.block[done, None] + 1) * b
        is_eos = (torch.isin(answer, eos) if eos.numel() else torch.zeros_like(answer, dtype=torch.bool)) & decoded
        finished = is_eos.any(1)
        first_eos = torch.where(finished, is_eos.long().argmax(1), torch.full_like(index[:, 0], answer.shape[1]))
        valid = decoded & (index <= first_eos[:, None])
        ids = rows.ids[done].cpu()
        out["answer"][ids] = torch.where(valid, answer, torch.full_like(answer, pad_id)).cpu()
        steps = torch.where(valid, steps, torch.full_like(steps, -1))
        out["commit"][ids] = steps.cpu()
        out["valid"][ids] = valid.cpu()
        out["finished"][ids] = finished.cpu()
        out["rounds"][ids] = (steps.max(1).values + 1).cpu()
