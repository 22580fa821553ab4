"""LIFT (``objectives/lift.py``): the superset / selection rule against a brute-force reference on
fixed draws, its rates, the built batch, CART weights, and the student scorer against a dense
reference. The loss against a dense float64 reference (TP=1 in-process; DP=2 / TP=2 / PP=2 under
torchrun) is the ``lift`` kind of tests/test_normalization.py; training at TP=2 / PP=2 == TP=1 in
tests/test_objectives_parallel.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron.model import masks
from opdlm_megatron.model.build import build_model
from opdlm_megatron.objectives import StateContext, get_objective
from opdlm_megatron.objectives.lift import (EASIEST, HARDEST, RANDOM, LIFTDraws, cart_weights, lift_selection,
                                            mode_for, noise_levels)
from opdlm_megatron.objectives.scoring import StudentScorer, StudentScores
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.objectives.lift import LIFTConfig
from tests.distributed.student_data import EOS, student_config, synthetic_rollout


def test_mode_by_t():
    t = torch.tensor([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9], dtype=torch.float64)
    # lift: argmax([3t(1-t), t, 1-t]) -> hardest below t = 1/3, random up to 2/3, easiest above
    H, R, E = HARDEST, RANDOM, EASIEST
    assert mode_for(t, "lift").tolist() == [H, H, H, R, R, R, E, E]
    assert mode_for(t, "lift2").tolist() == [H, H, H, H, H, E, E, E]
    with pytest.raises(ValueError, match="unknown LIFT variant 'lift3'"):
        mode_for(t, "lift3")


def test_noise_levels():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    t, rho = noise_levels(u, torch.full_like(u, 0.5), eps=1e-3, rho_min=0.1)
    assert float(t.min()) == pytest.approx(1e-3) and float(t.max()) == pytest.approx(1.0)
    wide = (1 - t) > 0.1
    assert torch.allclose(rho[wide], 0.1 + 0.5 * (1 - t[wide] - 0.1))
    assert torch.allclose(rho[~wide], 0.5 * (1 - t[~wide]))
    assert bool(((t + rho) <= 1 + 1e-12).all())


def _reference_selection(kept, draws, group_of_row, variant, eps, rho_min, scores):
    """Row by row, token by token."""
    out = torch.zeros_like(kept)
    for b in range(kept.shape[0]):
        g = int(group_of_row[b])
        t = (1 - eps) * float(draws.t[g]) + eps
        low = 0.0 if 1 - t <= rho_min else rho_min
        rho = low + (1 - t - low) * float(draws.rho[g])
        superset = [i for i in range(kept.shape[1]) if kept[b, i] and float(draws.token[b, i]) < t + rho]
        k = round(len(superset) * t / (t + rho))
        if variant == "lift":
            mode = max(range(3), key=lambda m: ([3 * t * (1 - t), t, 1 - t][m], -m))
        else:
            mode = EASIEST if t > 0.5 else HARDEST
        if mode == RANDOM:
            key = {i: float(draws.pick[b, i]) for i in superset}
        elif mode == EASIEST:
            key = {i: -float(scores[b, i]) for i in superset}
        else:
            key = {i: float(scores[b, i]) for i in superset}
        for i in sorted(superset, key=lambda i: (key[i], i))[:k]:
            out[b, i] = True
    return out


@pytest.mark.parametrize("variant", ["lift", "lift2"])
@pytest.mark.parametrize("seed", range(4))
def test_selection_matches_brute_force(variant, seed):
    g = torch.Generator().manual_seed(seed)
    rows, length, group = 12, 15, 3
    kept = torch.rand(rows, length, generator=g) < 0.85
    scores = torch.randint(-5, 1, (rows, length), generator=g).double()  # ties on purpose
    group_of_row = torch.arange(rows) // group
    draws = LIFTDraws.sample(rows, length, rows // group, g)
    calls = []

    def score(superset):
        calls.append(superset.clone())
        return torch.where(superset, scores, torch.full_like(scores, 99.0))

    selected, superset, t, mode = lift_selection(kept, draws, group_of_row, variant, 1e-3, 0.1, score)
    want = _reference_selection(kept, draws, group_of_row, variant, 1e-3, 0.1, scores)
    assert torch.equal(selected, want)
    assert bool((selected <= superset).all()) and bool((superset <= kept).all())
    assert len(calls) <= 1 and (not calls or torch.equal(calls[0], superset))
    for b in range(rows):  # one t and mode per group of rows
        assert float(t[b]) == float(t[b - b % group]) and int(mode[b]) == int(mode[b - b % group])


def test_superset_rate_and_kept_share():
    g = torch.Generator().manual_seed(0)
    rows, length = 4000, 20
    kept = torch.ones(rows, length, dtype=torch.bool)
    draws = LIFTDraws.sample(rows, length, 1, g)
    draws.t[:] = 0.3
    draws.rho[:] = 0.5
    selected, superset, t, _ = lift_selection(kept, draws, torch.zeros(rows, dtype=torch.long), "lift", 0.0, 0.1,
                                              lambda s: torch.zeros(s.shape))
    rho = 0.1 + 0.5 * (1 - 0.3 - 0.1)
    rate = float(superset.double().mean())
    assert rate == pytest.approx(0.3 + rho, abs=4 * math.sqrt((0.3 + rho) * (0.7 - rho) / superset.numel()))
    n = superset.sum(-1).double()
    assert torch.equal(selected.sum(-1), torch.round(n * 0.3 / (0.3 + rho)).long())


def _fixed_scorer(scores):
    def score(answers, xt, positions, split_data_parallel=False):
        return StudentScores(torch.where(positions, scores, 0.0), torch.zeros_like(answers.answer_ids))
    return score


@pytest.mark.parametrize("weighting", ["inverse_t", "cart"])
def test_built_batch(weighting):
    config = student_config()
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=4, seed=3)
    scores = -torch.rand(result.answer_ids.shape, generator=torch.Generator().manual_seed(1))
    ctx = StateContext(mask_token_id=config.mask_token_id, block_size=config.block_size, end_of_turn_ids=[EOS],
                       micro_batch_size=2, score_student=_fixed_scorer(scores))
    obj = get_objective("lift")
    obj.settings = LIFTConfig(weighting=weighting)
    batch = obj.build(result, torch.Generator().manual_seed(9), ctx)
    kept = batch.normalizer  # every response token up to the end of turn
    draws = LIFTDraws.sample(4, result.answer_ids.shape[1], 2, torch.Generator().manual_seed(9))
    want = _reference_selection(kept, draws, torch.arange(4) // 2, "lift", 1e-3, 0.1, scores)
    assert torch.equal(batch.supervised, want)
    assert torch.equal(batch.xt == config.mask_token_id, want)
    assert torch.equal(batch.xt[~want], result.answer_ids[~want])
    assert not batch.distill and batch.layout == "opd"
    t = (1 - 1e-3) * draws.t + 1e-3
    if weighting == "inverse_t":
        for b in range(4):
            assert torch.allclose(batch.weights[b][kept[b]], torch.full_like(batch.weights[b][kept[b]],
                                                                              1 / float(t[b // 2])))
    else:
        valid = torch.cat([result.prompt_valid, result.answer_valid], 1)
        masked = torch.cat([torch.zeros_like(result.prompt_valid), want], 1)
        plen = result.prompt_ids.shape[1]
        for b, i in want.nonzero().tolist():
            w = sum(0.5 * 0.1 * 0.9 ** (abs(plen + i - j) - 1) for j in range(valid.shape[1])
                    if valid[b, j] and not masked[b, j] and j != plen + i)
            assert float(batch.weights[b, i]) == pytest.approx(w, rel=1e-5)


def test_cart_weights_far_from_context_are_small():
    masked = torch.tensor([[False] + [True] * 30 + [False]])
    w = cart_weights(masked, torch.ones_like(masked), 0.1)[0]
    assert float(w[1]) == pytest.approx(0.05 + 0.05 * 0.9 ** 29, rel=1e-9)
    assert float(w[15]) < float(w[1])


def test_lift_needs_a_scorer():
    config = student_config()
    ctx = StateContext(mask_token_id=config.mask_token_id, block_size=4, end_of_turn_ids=[EOS])
    with pytest.raises(ValueError, match="score_student is required"):
        get_objective("lift").build(synthetic_rollout(config.vocab_size), torch.Generator(), ctx)


def test_student_scorer_matches_a_dense_forward():
    config = student_config()
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, seed=4)
    g = torch.Generator().manual_seed(2)
    positions = (torch.rand(result.answer_ids.shape, generator=g) < 0.5) & result.answer_valid
    xt = torch.where(positions, torch.full_like(result.answer_ids, config.mask_token_id), result.answer_ids)
    with initialize_runtime(device="cpu", seed=5):
        model = build_model(config, "student")
        got = StudentScorer(model, config, micro_batch_size=2, chunk_tokens=3)(result, xt, positions)
        opd = masks.opd_training_batch(result.prompt_ids, result.prompt_valid, result.answer_ids, xt,
                                       result.answer_valid, config.block_size)
        with torch.no_grad():
            logits = model(opd.input_ids, opd.position_ids, opd.layout.dense_mask()).double()
    real = ~config.unused_token_mask(0, logits.shape[-1])
    for b, i in positions.nonzero().tolist():
        logp = F.log_softmax(logits[b, opd.prediction_columns[b, i]].masked_fill(~real, float("-inf")), -1)
        assert float(got.log_prob[b, i]) == pytest.approx(float(logp[result.answer_ids[b, i]]), abs=1e-5)
        assert int(got.argmax[b, i]) == int(logp.argmax())
    assert bool((got.argmax[~positions] == -1).all()) and bool((got.log_prob[~positions] == 0).all())
