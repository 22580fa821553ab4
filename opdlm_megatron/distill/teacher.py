"""The frozen autoregressive teacher: target distributions for every answer token.

The teacher is the original ARLM as a second ``GPTModel`` in the student's process groups and
parallel layout (same TP/PP split), in eval mode, without gradients and outside every optimizer
and student checkpoint; it is loaded from its own checkpoint, optionally in lower precision, and
may be larger than the student as long as the vocabularies match (paper A.2).

One causal forward over ``[prompt; x0]`` gives the teacher distribution for every answer position:
the logits at the column of token ``i - 1`` are the target for answer token ``i`` (paper,
Algorithm 1, ``p_ARLM(. | x0^{<b}, x0^{b,<i})``). The forward runs through megatron-core's
pipeline schedule in forward-only mode, microbatch by microbatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch
from torch import Tensor

from ..config.model import DTYPES, ModelConfig, canonical_dtype
from ..model.masks import causal_layout, right_padded
from ..runtime.distributed import broadcast_from_last_stage

if TYPE_CHECKING:
    from ..model.losses import TeacherTopK


_RUN_FORWARD = object()  # answer_nll's default: no logits given, run the teacher


def check_vocab_compatible(teacher: ModelConfig, student: ModelConfig, tensor_model_parallel_size: int = 1) -> None:
    """Raises a ValueError naming the mismatch unless the two vocabularies line up shard for shard."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"teacher vocab_size {teacher.vocab_size} != student vocab_size {student.vocab_size}: "
            "teacher and student need the same tokenizer"
        )
    if teacher.mask_token_id != student.mask_token_id:
        raise ValueError(f"teacher mask_token_id {teacher.mask_token_id} != student mask_token_id {student.mask_token_id}")
    t_pad = teacher.padded_vocab_size(tensor_model_parallel_size)
    s_pad = student.padded_vocab_size(tensor_model_parallel_size)
    if t_pad != s_pad:
        raise ValueError(
            f"teacher padded vocabulary {t_pad} != student padded vocabulary {s_pad} at TP={tensor_model_parallel_size}: "
            "pin both with ModelConfig.padded_vocab (checkpoints do) so their logits shard alike"
        )


def _check_answer_batch(prompt_ids: Tensor, prompt_valid: Tensor, answer_ids: Tensor, answer_valid: Tensor) -> None:
    if prompt_ids.shape != prompt_valid.shape or answer_ids.shape != answer_valid.shape:
        raise ValueError(
            f"prompt ids {tuple(prompt_ids.shape)} / valid {tuple(prompt_valid.shape)} and answer ids "
            f"{tuple(answer_ids.shape)} / valid {tuple(answer_valid.shape)} must match pairwise"
        )
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != answer_ids.shape[0]:
        raise ValueError(f"prompts {tuple(prompt_ids.shape)} and answers {tuple(answer_ids.shape)} must be [B, *] alike")
    if prompt_valid.dtype != torch.bool or answer_valid.dtype != torch.bool:
        raise ValueError("prompt_valid and answer_valid must be bool tensors")
    if not prompt_valid[:, -1].all():
        raise ValueError("prompts must be left-padded with at least one token (prompt_valid[:, -1] all True)")
    if not right_padded(answer_valid):
        raise ValueError("answer_valid must be right-padded (no valid token after a padding token)")


class FrozenTeacher:
    """A frozen teacher ``GPTModel`` (this rank's part) and its config.

    ``config`` is the teacher's own architecture; ``student_config`` is only checked for a
    compatible vocabulary (same tokenizer size, mask id and padded size).
    """

    def __init__(self, model, config: ModelConfig, student_config: ModelConfig) -> None:
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        check_vocab_compatible(config, student_config, tp)
        self.model = model
        self.config = config
        self.student_config = student_config
        model.eval()
        model.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, directory: str, student_config: ModelConfig,
                        dtype: Union[None, str, torch.dtype] = None) -> "FrozenTeacher":
        """Builds the teacher for the current parallel layout from its checkpoint (any TP/PP).

        ``dtype`` (e.g. ``"bfloat16"``) builds it in lower precision; the weights are cast on load.
        """
        from ..checkpoint.model import load_model_checkpoint, load_model_config
        from ..model.build import build_model

        config = load_model_config(directory)
        if dtype is not None:
            if isinstance(dtype, torch.dtype):
                names = {v: k for k, v in DTYPES.items()}
                if dtype not in names:
                    raise ValueError(f"unsupported teacher dtype {dtype}; expected one of {sorted(DTYPES)}")
                dtype = names[dtype]
            config = config.replace(params_dtype=canonical_dtype(dtype))
        model = build_model(config, "teacher")
        load_model_checkpoint(model, directory)
        return cls(model, config, student_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.config.torch_dtype

    def _output_shard(self):
        """``(columns, device, excluded)``: this rank's vocabulary columns of the output layer, its device,
        and which of those columns are not tokens (padding, unused rows, [MASK])."""
        from megatron.core import parallel_state

        from ..model.losses import unused_vocab_columns

        tp = parallel_state.get_tensor_model_parallel_world_size()
        device = next(self.model.parameters()).device
        return self.config.padded_vocab_size(tp) // tp, device, unused_vocab_columns(self.config).to(device)

    def _allocate(self, shape: Tuple[int, ...], top_k: Optional[int], with_nll: bool = False):
        """The targets' storage for ``shape`` positions on the last pipeline stage (None elsewhere):
        logits ``[*shape, V/TP]`` in the teacher's dtype, or a ``TeacherTopK`` of ``[*shape, k]`` (with a
        ``[*shape]`` NLL when ``with_nll``)."""
        from megatron.core import parallel_state

        from ..model.losses import TeacherTopK

        if not parallel_state.is_pipeline_last_stage():
            return None
        shard, device, _ = self._output_shard()
        if top_k is None:
            return torch.empty((*shape, shard), dtype=self.dtype, device=device)
        k = min(top_k, shard * parallel_state.get_tensor_model_parallel_world_size())
        return TeacherTopK(torch.empty((*shape, k), device=device), torch.empty((*shape, k), dtype=torch.long,
                                                                                 device=device),
                           torch.empty(shape, device=device), torch.zeros(shape, device=device) if with_nll else None)

    def _forward(self, prompt_ids: Tensor, prompt_valid: Tensor, answer_ids: Tensor, answer_valid: Tensor,
                 needed: Tensor, micro_batch_size: int, consume, chunk_tokens: int = 1024) -> None:
        """One causal forward over ``[prompt; answer[:-1]]`` (``model.forward_answer_columns``): the
        output layer runs only on the columns that predict the ``needed`` answer positions."""
        from ..model.build import forward_answer_columns

        _check_answer_batch(prompt_ids, prompt_valid, answer_ids, answer_valid)
        if answer_ids.shape[1] == 0:
            return
        bsz, plen = prompt_ids.shape
        # the last answer token predicts nothing inside the answer: leave it out of the forward
        input_ids = torch.cat([prompt_ids, answer_ids[:, :-1]], 1)
        valid = torch.cat([prompt_valid, answer_valid[:, :-1]], 1)
        columns = plen - 1 + torch.arange(answer_ids.shape[1])[None].expand(bsz, -1)
        # each row's tokens first, its padding after (the left-padded prompt moves left): the same
        # causal attention over the real tokens, in rows a causal kernel serves without a mask
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        moved_to = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
        input_ids, valid, columns = input_ids.gather(1, order), valid.gather(1, order), moved_to.gather(1, columns)
        layout = causal_layout(valid)
        self.model.eval()
        forward_answer_columns(self.model, self.config, input_ids, layout, columns, needed, micro_batch_size,
                               consume, chunk_tokens)

    @torch.no_grad()
    def answer_logits(self, prompt_ids: Tensor, prompt_valid: Tensor, answer_ids: Tensor, answer_valid: Tensor,
                      micro_batch_size: int, top_k: Optional[int] = None,
                      chunk_tokens: int = 1024) -> Union[None, Tensor, "TeacherTopK"]:
        """Teacher logits ``[B, A, V/TP]`` (teacher dtype) for every answer token, on the last stage.

        Row ``b``, position ``i`` holds the vocab-parallel logits that predict ``answer_ids[b, i]``
        (the output at the previous token). Prompts are left-padded, answers right-padded; entries
        at answer padding are finite but meaningless. Other pipeline stages return None.

        With ``top_k`` only the teacher's top-k per position is kept (a ``losses.TeacherTopK`` with
        ``[B, A, k]`` values/ids, the log-normaliser and the teacher NLL of the answer tokens),
        computed microbatch by microbatch, so the full ``[B, A, V/TP]`` logits never exist at once.
        [MASK] and padded vocabulary rows are excluded from it. Training uses ``targets``, which keeps
        only the positions the loss reads.
        """
        from ..model.losses import TeacherTopK, masked_diffusion_nll

        shard, device, excluded = self._output_shard()
        out = self._allocate(tuple(answer_ids.shape), top_k, with_nll=True)

        def consume(rows, answer_index, slot_valid, logits):
            # every position is needed: the slots of a chunk are consecutive answer positions
            start, end = int(answer_index[0, 0]), int(answer_index[0, -1]) + 1
            rows = rows.to(device)
            if top_k is None:
                out[rows, start:end] = logits.to(out.dtype)
                return
            top = TeacherTopK.from_logits(logits, top_k, excluded, chunk_tokens)
            out.values[rows, start:end], out.indices[rows, start:end] = top.values, top.indices
            out.logsumexp[rows, start:end] = top.logsumexp
            cpu_rows = rows.cpu()
            valid = answer_valid[cpu_rows, start:end]
            targets = torch.where(valid, answer_ids[cpu_rows, start:end], 0).to(logits.device)
            nll = masked_diffusion_nll(logits.reshape(-1, shard), targets.reshape(-1), excluded, chunk_tokens)
            out.answer_nll[rows, start:end] = torch.where(valid.to(logits.device), nll.view(targets.shape), 0.0)

        self._forward(prompt_ids, prompt_valid, answer_ids, answer_valid, torch.ones_like(answer_valid),
                      micro_batch_size, consume, chunk_tokens)
        return out

    @torch.no_grad()
    def targets(self, prompt_ids: Tensor, prompt_valid: Tensor, answer_ids: Tensor, answer_valid: Tensor,
                positions: Tensor, micro_batch_size: int, top_k: Optional[int] = None, chunk_tokens: int = 1024,
                nll_positions: Optional[Tensor] = None) -> "TeacherTargets":
        """The teacher's targets for the answer ``positions`` ``[B, A]`` (bool) only.

        Keeps, on the last pipeline stage, the logits of exactly those positions packed as
        ``[N, V/TP]`` (teacher dtype), or with ``top_k`` only their top-k (``TeacherTopK`` ``[N, k]``,
        plus the log-normaliser); the output layer runs only on the columns that predict them (and
        the ``nll_positions``, whose teacher NLL is returned on every rank as ``answer_nll`` ``[B, A]``).
        """
        from ..model.losses import TeacherTopK, masked_diffusion_nll

        if positions.shape != answer_ids.shape or positions.dtype != torch.bool:
            raise ValueError(f"positions must be a bool [B, A] = {tuple(answer_ids.shape)} tensor, got "
                             f"{tuple(positions.shape)} {positions.dtype}")
        positions = positions & answer_valid
        nll_positions = torch.zeros_like(positions) if nll_positions is None else nll_positions & answer_valid
        _, device, excluded = self._output_shard()
        count = int(positions.sum())
        index = torch.full(answer_ids.shape, -1, dtype=torch.long)
        index[positions] = torch.arange(count)
        packed = self._allocate((count,), top_k)
        nll = torch.zeros(answer_ids.shape, dtype=torch.float32)

        def consume(rows, answer_index, slot_valid, logits):
            flat_rows = rows[:, None].expand_as(answer_index)[slot_valid]
            flat_pos = answer_index[slot_valid]
            chosen = logits[slot_valid.to(logits.device)]  # [n, V/TP]
            want_nll = nll_positions[flat_rows, flat_pos]
            if bool(want_nll.any()):
                ids = answer_ids[flat_rows[want_nll], flat_pos[want_nll]].to(logits.device)
                nll[flat_rows[want_nll], flat_pos[want_nll]] = masked_diffusion_nll(
                    chosen[want_nll.to(logits.device)], ids, excluded, chunk_tokens).float().cpu()
            keep = positions[flat_rows, flat_pos]
            if not bool(keep.any()):
                return
            slots = index[flat_rows[keep], flat_pos[keep]].to(device)
            kept = chosen[keep.to(logits.device)]
            if top_k is None:
                packed[slots] = kept.to(packed.dtype)
            else:
                top = TeacherTopK.from_logits(kept, top_k, excluded, chunk_tokens)
                packed.values[slots], packed.indices[slots], packed.logsumexp[slots] = (
                    top.values, top.indices, top.logsumexp)

        self._forward(prompt_ids, prompt_valid, answer_ids, answer_valid, positions | nll_positions,
                      micro_batch_size, consume, chunk_tokens)
        return TeacherTargets(index=index, logits=packed, answer_nll=broadcast_from_last_stage(nll))

    @torch.no_grad()
    def branch_log_probs(self, prompt_ids: Tensor, prompt_valid: Tensor, answer_ids: Tensor, answer_valid: Tensor,
                         forks: Tensor, candidates: Tensor, ends: Tensor, micro_batch_size: int,
                         chunk_tokens: int = 1024) -> Tensor:
        """``sum_{j=i+1}^{e-1} log p(x0_j | prompt, x0_<i, v, x0_{i+1:j})`` ``[F, K]`` (fp64, every rank)
        for each fork ``(b, i)`` of ``forks`` ``[F, 2]``, each candidate ``v`` of ``candidates``
        ``[F, K]`` (global token ids) and the exclusive end ``e`` of ``ends`` ``[F]`` (answer
        coordinates; 0 where ``e <= i + 1``).

        All branches ``[v, x0_{i+1}, ..., x0_{e-2}]`` of a row are appended to its trunk
        ``[prompt; x0_<I]`` (``masks.branch_layout``) and scored in one forward, so the trunk's keys
        and values are computed once for all of them; a collective over the model-parallel groups
        like every teacher forward (the branches are identical on every rank).
        """
        from megatron.core import parallel_state

        from ..model import vocab_parallel as vp
        from ..model.build import uses_causal_kernel
        from ..model.losses import unused_vocab_columns
        from ..model.masks import branch_layout

        if uses_causal_kernel(self.model):
            raise ValueError("TCS's branches need a teacher built with the arbitrary mask, not the causal kernel")
        _check_answer_batch(prompt_ids, prompt_valid, answer_ids, answer_valid)
        num_forks, num_cands = candidates.shape
        if forks.shape != (num_forks, 2) or ends.shape != (num_forks,):
            raise ValueError(f"forks {tuple(forks.shape)} must be [F, 2] and ends {tuple(ends.shape)} [F] with "
                             f"F = {num_forks} (candidates {tuple(candidates.shape)})")
        lengths = (ends - 1 - forks[:, 1]).clamp_min(0)  # branch tokens per candidate
        out = torch.zeros(num_forks, num_cands, dtype=torch.float64)
        if num_forks == 0 or int(lengths.max()) == 0:
            return out
        bsz, plen = prompt_ids.shape
        trunk_len = int(forks[lengths > 0, 1].max())  # the trunk holds x0_<i of every fork
        prompt_lengths = prompt_valid.sum(-1)
        # per row: the branch tokens, their (fork, candidate), target token, position and fork block
        per_row = [[] for _ in range(bsz)]
        for f in torch.nonzero(lengths > 0).flatten().tolist():
            b, i, n = int(forks[f, 0]), int(forks[f, 1]), int(lengths[f])
            base = int(prompt_lengths[b]) + i
            for c in range(num_cands):
                tokens = [int(candidates[f, c])] + answer_ids[b, i + 1:i + n].tolist()
                targets = answer_ids[b, i + 1:i + 1 + n].tolist()
                per_row[b].append((f, c, tokens, targets, base))
        width = max(sum(len(t[2]) for t in row) for row in per_row)
        ids = torch.full((bsz, width), self.config.pad_token_id or 0, dtype=torch.long)
        branch = torch.zeros((bsz, width), dtype=torch.long)
        fork_block = torch.zeros((bsz, width), dtype=torch.long)
        position = torch.zeros((bsz, width), dtype=torch.long)
        valid = torch.zeros((bsz, width), dtype=torch.bool)
        slot_fork = torch.zeros((bsz, width), dtype=torch.long)
        slot_cand = torch.zeros((bsz, width), dtype=torch.long)
        slot_target = torch.zeros((bsz, width), dtype=torch.long)
        for b, row in enumerate(per_row):
            col = 0
            for number, (f, c, tokens, targets, base) in enumerate(row, start=1):
                n = len(tokens)
                sl = slice(col, col + n)
                ids[b, sl] = torch.tensor(tokens)
                branch[b, sl], fork_block[b, sl], valid[b, sl] = number, base - 1, True
                position[b, sl] = base + torch.arange(n)
                slot_fork[b, sl], slot_cand[b, sl] = f, c
                slot_target[b, sl] = torch.tensor(targets)
                col += n
        trunk_valid = torch.cat([prompt_valid, answer_valid[:, :trunk_len]], 1)
        layout = branch_layout(causal_layout(trunk_valid), branch, fork_block, position, valid)
        input_ids = torch.cat([prompt_ids, answer_ids[:, :trunk_len], ids], 1)
        columns = plen + trunk_len + torch.arange(width)[None].expand(bsz, -1)
        last_stage = parallel_state.is_pipeline_last_stage()
        device = next(self.model.parameters()).device
        excluded = unused_vocab_columns(self.config).to(device)

        def consume(rows, slot_index, slot_valid, logits):
            flat_rows = rows[:, None].expand_as(slot_index)[slot_valid]
            flat_slots = slot_index[slot_valid]
            chosen = logits[slot_valid.to(logits.device)].float().masked_fill(excluded, float("-inf"))
            target = slot_target[flat_rows, flat_slots].to(logits.device)
            logp = vp.gather_global_columns(chosen, target[:, None])[:, 0] - vp.global_logsumexp(chosen)
            out.index_put_((slot_fork[flat_rows, flat_slots], slot_cand[flat_rows, flat_slots]),
                           logp.double().cpu(), accumulate=True)

        self.model.eval()
        from ..model.build import forward_answer_columns

        forward_answer_columns(self.model, self.config, input_ids, layout, columns, valid, micro_batch_size,
                               consume, chunk_tokens)
        if not last_stage:
            out.zero_()
        return broadcast_from_last_stage(out)

    @torch.no_grad()
    def answer_nll(self, prompt_ids: Tensor, prompt_valid: Tensor, answer_ids: Tensor, answer_valid: Tensor,
                   micro_batch_size: int, logits=_RUN_FORWARD, chunk_tokens: int = 1024) -> Tensor:
        """Teacher NLL ``[B, A]`` (fp32, 0 on padding) of the answer tokens, on every rank.

        Pass ``logits`` = what ``answer_logits`` returned on this rank (full logits or a
        ``TeacherTopK`` on the last stage, None elsewhere) to skip the forward; every pipeline stage
        must make the same choice, since the forward is a collective. [MASK] and padded
        vocabulary rows get no probability mass.
        """
        from megatron.core import parallel_state

        from ..model.losses import TeacherTopK, masked_diffusion_nll, unused_vocab_columns

        if logits is _RUN_FORWARD:
            return self.targets(prompt_ids, prompt_valid, answer_ids, answer_valid,
                                torch.zeros_like(answer_valid), micro_batch_size, chunk_tokens=chunk_tokens,
                                nll_positions=answer_valid).answer_nll
        nll = torch.zeros(answer_ids.shape, dtype=torch.float32)
        if parallel_state.is_pipeline_last_stage() and isinstance(logits, TeacherTopK):
            nll = logits.answer_nll.float().cpu()
        elif parallel_state.is_pipeline_last_stage():
            flat = logits.reshape(-1, logits.shape[-1])
            targets = torch.where(answer_valid, answer_ids, torch.zeros_like(answer_ids))
            per_token = masked_diffusion_nll(flat, targets.reshape(-1).to(flat.device),
                                             unused_vocab_columns(self.config), chunk_tokens)
            nll = torch.where(answer_valid, per_token.view(answer_ids.shape).cpu(), nll)
        return broadcast_from_last_stage(nll)


@dataclass
class TeacherTargets:
    """The teacher's targets for a batch of answers, keeping only the positions the loss reads.

    ``index`` ``[B, A]`` (long, CPU): the row of ``logits`` holding the target of each answer
    position, -1 where none was kept. ``logits`` (last pipeline stage; None elsewhere): packed
    vocab-parallel logits ``[N, V/TP]`` or a ``TeacherTopK`` with ``[N, k]``. ``answer_nll``
    ``[B, A]``: the teacher NLL of the answer tokens where it was asked for (0 elsewhere), on every rank.

    An objective may add a second target for some positions (TCS, ``objectives/tcs.py``): the loss
    there is ``D(q) + w (D(q_alt) - D(q))`` with ``q_alt`` = ``correction_logits[correction_index]``
    (same format as ``logits``) and ``w`` = ``correction_weight`` ``[B, A]``.
    """

    index: Tensor
    logits: Union[None, Tensor, "TeacherTopK"]
    answer_nll: Optional[Tensor] = None
    correction_index: Optional[Tensor] = None
    correction_logits: Union[None, Tensor, "TeacherTopK"] = None
    correction_weight: Optional[Tensor] = None

    @classmethod
    def dense(cls, logits: Union[Tensor, "TeacherTopK"], shape) -> "TeacherTargets":
        """Targets for every position from dense ``[B, A, V/TP]`` logits or a ``[B, A]`` TeacherTopK."""
        from ..model.losses import TeacherTopK

        bsz, alen = shape
        index = torch.arange(bsz * alen).view(bsz, alen)
        if isinstance(logits, TeacherTopK):
            flat = TeacherTopK(logits.values.reshape(bsz * alen, -1), logits.indices.reshape(bsz * alen, -1),
                               logits.logsumexp.reshape(bsz * alen))
            return cls(index, flat, logits.answer_nll)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(shape):
            raise ValueError(f"dense teacher logits must be [B, A, V/TP] with [B, A] = {tuple(shape)}, got "
                             f"{tuple(logits.shape)}")
        return cls(index, logits.reshape(bsz * alen, logits.shape[-1]))

    def for_rows(self, source: Tensor) -> "TeacherTargets":
        """The targets of rows that are copies of these rows: row ``b`` reads row ``source[b]``'s
        targets (the packed logits are shared, not copied)."""
        if self.correction_index is not None:
            raise ValueError("targets with a correction cannot be shared between rows")
        nll = None if self.answer_nll is None else self.answer_nll[source]
        return TeacherTargets(self.index[source], self.logits, nll)

    def lookup(self, rows: Tensor, positions: Tensor, device) -> Union[Tensor, "TeacherTopK"]:
        """The targets of answer positions ``(rows, positions)`` (both ``[n]``), on ``device``."""
        slots = self.index[rows.cpu(), positions.cpu()]
        if bool((slots < 0).any()):
            raise ValueError("teacher targets were not computed for some supervised positions")
        where = self.logits.device if isinstance(self.logits, Tensor) else self.logits.values.device
        return self.logits[slots.to(where)].to(device)

    def lookup_correction(self, rows: Tensor, positions: Tensor, device):
        """``(which [n] bool, weights [m], targets [m])`` of the corrected positions among ``(rows,
        positions)``, or None when the targets carry no correction."""
        if self.correction_index is None:
            return None
        slots = self.correction_index[rows.cpu(), positions.cpu()]
        which = slots >= 0
        weights = self.correction_weight[rows.cpu(), positions.cpu()][which]
        logits = self.correction_logits
        where = logits.device if isinstance(logits, Tensor) else logits.values.device
        return which.to(device), weights.to(device), logits[slots[which].to(where)].to(device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the targets on this rank."""
        parts = [self.index]
        if self.logits is not None:
            parts += [self.logits] if isinstance(self.logits, Tensor) else [
                self.logits.values, self.logits.indices, self.logits.logsumexp]
        return sum(t.numel() * t.element_size() for t in parts)
