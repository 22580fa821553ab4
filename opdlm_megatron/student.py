"""One student forward/backward on the OPD training layout ``[prompt | x0 | xt]``.

The student sees the prompt and the clean answer x0 block-causally and, per block, the partially
masked copy xt of that block (``masks.opd_training_batch``); the loss is taken at the masked xt
positions only (and only at answer tokens kept by ``losses.answer_loss_mask``), reading each answer
token's prediction from its ``prediction_columns`` column (with or without the Dream-style logit
shift). Microbatches run through megatron-core's ``get_forward_backward_func``, so pipeline
parallelism, gradient accumulation and megatron DDP (``main_grad``) work as in any megatron run.

Objectives:

* ``"distill"`` - ``targets`` are the teacher's vocab-parallel logits ``[B, A, V/TP]``
  (``FrozenTeacher.answer_logits``, needed on the last pipeline stage only), or for the top-k
  divergences its ``TeacherTopK``; per-token loss is the configured divergence (paper: forward KL).
* ``"ce"`` - ``targets`` are token ids ``[B, A]``; per-token loss is the NLL, times ``loss_weights``
  when given (1/t for the masked-diffusion baseline; none for SFT).

Normalisation (paper): per row, the sum of per-token losses over its supervised tokens divided by
the number of supervised tokens; then the mean over rows with at least one supervised token. With
1/t weights the row sum is divided by the row's answer tokens instead (``token_normalizer="answer"``,
the MDLM/LLaDA estimator of the ELBO), which is the default when ``loss_weights`` is given.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .config import ModelConfig
from .losses import DivergenceConfig, TeacherTopK, answer_loss_mask, divergence, masked_diffusion_nll, unused_vocab_columns
from .masks import opd_training_batch
from .model import attention_mask, broadcast_from_last_stage
from .rollout.types import RolloutResult
from .teacher import microbatch_rows

OBJECTIVES = ("distill", "ce")
TOKEN_NORMALIZERS = ("supervised", "answer")


def supervised_tokens(result: RolloutResult, xt: Tensor, mask_token_id: int, end_of_turn_ids: Sequence[int],
                      include_end_of_turn: bool = True) -> Tensor:
    """``[B, A]`` bool: masked xt positions that are answer tokens kept by the loss mask."""
    keep = answer_loss_mask(result.answer_ids, result.answer_valid, end_of_turn_ids, include_end_of_turn)
    return keep & (xt == mask_token_id)


def _check_inputs(config: ModelConfig, result: RolloutResult, xt: Tensor, targets, objective: str,
                  loss_weights: Optional[Tensor], token_normalizer: str, last_stage: bool) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if token_normalizer not in TOKEN_NORMALIZERS:
        raise ValueError(f"unknown token_normalizer {token_normalizer!r}; expected one of {TOKEN_NORMALIZERS}")
    shape = tuple(result.answer_ids.shape)
    if tuple(xt.shape) != shape:
        raise ValueError(f"xt {tuple(xt.shape)} must have the answers' shape {shape}")
    if loss_weights is not None and tuple(loss_weights.shape) != shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must have the answers' shape {shape}")
    if objective == "ce" and (targets is None or tuple(targets.shape) != shape):
        raise ValueError(f"objective 'ce' needs token-id targets of shape {shape}, got "
                         f"{None if targets is None else tuple(targets.shape)}")
    if objective == "distill" and last_stage and isinstance(targets, TeacherTopK):
        if tuple(targets.values.shape[:2]) != shape:
            raise ValueError(f"TeacherTopK values {tuple(targets.values.shape)} must be [B, A, k] with [B, A] = {shape}")
    elif objective == "distill" and last_stage:
        if targets is None or targets.dim() != 3 or tuple(targets.shape[:2]) != shape:
            raise ValueError(f"objective 'distill' needs teacher logits [B, A, V/TP] with [B, A] = {shape} on the "
                             f"last pipeline stage, got {None if targets is None else tuple(targets.shape)}")
        excluded = unused_vocab_columns(config)
        if targets.shape[-1] != excluded.shape[0]:
            raise ValueError(f"teacher logits have {targets.shape[-1]} vocabulary columns per rank, the student "
                             f"{excluded.shape[0]}: the vocabularies differ")


def student_forward_backward(
    model,
    config: ModelConfig,
    result: RolloutResult,
    xt: Tensor,
    targets: Optional[Tensor],
    objective: str,
    divergence_cfg: Optional[DivergenceConfig],
    micro_batch_size: int,
    forward_only: bool = False,
    loss_weights: Optional[Tensor] = None,
    *,
    end_of_turn_ids: Optional[Sequence[int]] = None,
    include_end_of_turn: bool = True,
    token_normalizer: Optional[str] = None,
    num_rows: Optional[float] = None,
) -> Dict[str, float]:
    """Runs the student on ``[prompt | x0 | xt]`` over microbatches; gradients accumulate in ``model``.

    ``model``: the student (this rank's part; bare or megatron-DDP-wrapped). ``xt`` ``[B, A]``: the
    supervised state (``states.py``). ``end_of_turn_ids`` default to ``config.eos_token_ids``.
    ``num_rows`` overrides the row count of the outer mean (e.g. to normalise over a global batch).

    Returns floats, identical on every rank of the model-parallel group: ``loss`` (the objective),
    ``num_tokens`` (supervised tokens), ``num_rows`` (rows with a supervised token),
    ``token_mean`` (mean per-token loss over the supervised tokens, unweighted).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    last_stage = parallel_state.is_pipeline_last_stage()
    if token_normalizer is None:
        token_normalizer = "answer" if loss_weights is not None else "supervised"
    _check_inputs(config, result, xt, targets, objective, loss_weights, token_normalizer, last_stage)
    if objective == "distill" and divergence_cfg is None:
        raise ValueError("objective 'distill' needs a DivergenceConfig")
    eot = config.eos_token_ids if end_of_turn_ids is None else end_of_turn_ids

    kept = answer_loss_mask(result.answer_ids, result.answer_valid, eot, include_end_of_turn)
    supervised = kept & (xt == config.mask_token_id)
    counts = supervised.sum(-1) if token_normalizer == "supervised" else kept.sum(-1)
    rows_with_tokens = int((supervised.sum(-1) > 0).sum())
    outer = float(rows_with_tokens if num_rows is None else num_rows)

    batch = opd_training_batch(result.prompt_ids, result.prompt_valid, result.answer_ids, xt, result.answer_valid,
                               config.block_size, config.logit_shift)
    plan = microbatch_rows(result.batch_size, micro_batch_size)
    num_microbatches = len(plan)
    device = next(model.parameters()).device
    excluded = unused_vocab_columns(config).to(device)

    microbatches = []
    for rows, real in plan:
        microbatches.append(dict(
            ids=batch.input_ids[rows], layout=batch.layout.rows(rows), rows=rows,
            supervised=supervised[rows] & real[:, None], columns=batch.prediction_columns[rows],
        ))

    def loss_func(mb, output: Tensor):
        sup = mb["supervised"].to(output.device)
        row_idx, answer_idx = sup.nonzero(as_tuple=True)
        student_logits = output[row_idx, mb["columns"].to(output.device)[row_idx, answer_idx]]
        global_rows = mb["rows"].to(output.device)[row_idx]
        if objective == "distill":
            where = targets.values.device if isinstance(targets, TeacherTopK) else targets.device
            teacher_logits = targets[global_rows.to(where), answer_idx.to(where)].to(output.device)
            per_token = divergence(student_logits, teacher_logits, divergence_cfg, excluded)
        else:
            ids = targets.to(output.device)[global_rows, answer_idx]
            chunk = divergence_cfg.chunk_tokens if divergence_cfg is not None else 1024
            per_token = masked_diffusion_nll(student_logits, ids, excluded, chunk)
        weighted = per_token
        if loss_weights is not None:
            weighted = per_token * loss_weights.to(output.device)[global_rows, answer_idx]
        denom = counts.to(output.device)[global_rows].clamp_min(1).to(weighted.dtype)
        contribution = (weighted / denom).sum() / max(outer, 1.0)
        # megatron divides each microbatch's loss by num_microbatches; ours is already normalised
        stats = {"loss": contribution.detach(), "token_sum": per_token.detach().sum()}
        return contribution * num_microbatches, stats

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        lay = mb["layout"].to(device)
        output = model(mb["ids"].to(device), lay.position_ids, attention_mask(config, lay))
        return output, partial(loss_func, mb)

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=num_microbatches, seq_length=batch.input_ids.shape[1],
        micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64)
    if last_stage:
        totals[0] = sum(float(r["loss"]) for r in results)
        totals[1] = sum(float(r["token_sum"]) for r in results)
    broadcast_from_last_stage(totals)
    num_tokens = int(supervised.sum())
    return {
        "loss": float(totals[0]),
        "num_tokens": float(num_tokens),
        "num_rows": float(rows_with_tokens),
        "token_mean": float(totals[1]) / max(num_tokens, 1),
    }
