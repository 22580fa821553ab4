"""Log-likelihoods of continuations: exact for an AR model, a Monte-Carlo lower bound for a
block-diffusion student.

* ``ar_loglikelihood``: ``sum_i log p(c_i | context, c_<i)`` from one causal forward, and whether
  every continuation token is the greedy one (lm-eval's ``is_greedy``).
* ``block_diffusion_loglikelihood``: the block-diffusion ELBO (BD3LM) of the continuation given the
  context, ``sum_b E_{t_b ~ U(0,1)} [ 1/t_b sum_{i masked in block b} log p(c_i | context, c_<b, c_b^t) ]``
  with each token of block b masked with probability t_b, estimated with ``mc_samples`` draws. All
  blocks are scored in one forward of the training layout ``[context | c | c^t]`` (each block's
  masked copy sees the clean earlier blocks), so a sample costs one forward. The bound is <= the
  true log-likelihood; its expectation is what the brute-force test enumerates.

Both are collectives over the model-parallel group; results come back on every rank.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..config.model import ModelConfig
from ..distill.answers import mix_seed, results_from_answers
from ..model import vocab_parallel as vp
from ..model.build import forward_answer_columns
from ..model.losses import masked_diffusion_nll, unused_vocab_columns
from ..model.masks import causal_layout, opd_training_batch
from ..runtime.distributed import broadcast_from_last_stage


def _check(contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> None:
    if len(contexts) != len(continuations) or not contexts:
        raise ValueError(f"need as many contexts as continuations (> 0), got {len(contexts)} and {len(continuations)}")
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        if not c or not x:
            raise ValueError(f"request {i}: context and continuation must both be non-empty")


def ar_loglikelihood(model, config: ModelConfig, contexts: Sequence[Sequence[int]],
                     continuations: Sequence[Sequence[int]], micro_batch_size: int = 1,
                     chunk_tokens: int = 1024) -> List[Tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` per request for a causal (AR) model."""
    _check(contexts, continuations)
    r = results_from_answers(contexts, continuations, [True] * len(contexts), config.pad_token_id or 0)
    bsz, plen = r.prompt_ids.shape
    excluded = unused_vocab_columns(config)
    out = torch.zeros(bsz, 2, dtype=torch.float64)  # [log p, all greedy]
    out[:, 1] = 1.0
    input_ids = torch.cat([r.prompt_ids, r.answer_ids[:, :-1]], 1)
    layout = causal_layout(torch.cat([r.prompt_valid, r.answer_valid[:, :-1]], 1))
    columns = plen - 1 + torch.arange(r.answer_ids.shape[1])[None].expand(bsz, -1)

    def consume(rows, answer_index, slot_valid, logits):
        flat_rows = rows[:, None].expand_as(answer_index)[slot_valid]
        flat_pos = answer_index[slot_valid]
        chosen = logits[slot_valid.to(logits.device)]
        targets = r.answer_ids[flat_rows, flat_pos].to(logits.device)
        nll = masked_diffusion_nll(chosen, targets, excluded.to(logits.device), chunk_tokens).double().cpu()
        best = vp.global_argmax(chosen.float().masked_fill(excluded.to(logits.device), float("-inf")))[1].cpu()
        out[:, 0].index_add_(0, flat_rows, -nll)
        miss = torch.zeros(bsz, dtype=torch.float64).index_add_(0, flat_rows, (best != targets.cpu()).double())
        out[:, 1] *= (miss == 0).double()

    with torch.no_grad():
        model.eval()
        forward_answer_columns(model, config, input_ids, layout, columns, r.answer_valid, micro_batch_size, consume,
                               chunk_tokens)
    broadcast_from_last_stage(out)
    return [(float(lp), bool(g)) for lp, g in out.tolist()]


def block_diffusion_loglikelihood(model, config: ModelConfig, contexts: Sequence[Sequence[int]],
                                  continuations: Sequence[Sequence[int]], mc_samples: int = 8, seed: int = 0,
                                  micro_batch_size: int = 1, chunk_tokens: int = 1024) -> List[float]:
    """Monte-Carlo estimate of the block-diffusion lower bound of ``log p(continuation | context)``
    per request (see the module docstring); deterministic given ``seed``."""
    from ..distill.states import forward_mask

    _check(contexts, continuations)
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be positive, got {mc_samples}")
    r = results_from_answers(contexts, continuations, [True] * len(contexts), config.pad_token_id or 0)
    bsz = r.batch_size
    excluded = unused_vocab_columns(config)
    total = torch.zeros(bsz, dtype=torch.float64)
    model.eval()
    for sample in range(mc_samples):
        generator = torch.Generator().manual_seed(mix_seed(seed, sample, 5))
        xt, t = forward_mask(r.answer_ids, r.answer_valid, config.block_size, generator, config.mask_token_id,
                             eps=0.0, per="block")
        masked = (xt == config.mask_token_id) & r.answer_valid
        batch = opd_training_batch(r.prompt_ids, r.prompt_valid, r.answer_ids, xt, r.answer_valid,
                                   config.block_size, config.logit_shift)

        def consume(rows, answer_index, slot_valid, logits):
            flat_rows = rows[:, None].expand_as(answer_index)[slot_valid]
            flat_pos = answer_index[slot_valid]
            targets = r.answer_ids[flat_rows, flat_pos].to(logits.device)
            nll = masked_diffusion_nll(logits[slot_valid.to(logits.device)], targets, excluded.to(logits.device),
                                       chunk_tokens).double().cpu()
            total.index_add_(0, flat_rows, -nll / t[flat_rows, flat_pos].double())

        with torch.no_grad():
            forward_answer_columns(model, config, batch.input_ids, batch.layout, batch.prediction_columns, masked,
                                   micro_batch_size, consume, chunk_tokens)
    broadcast_from_last_stage(total)
    return (total / mc_samples).tolist()


