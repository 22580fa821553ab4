"""State selection: trajectory states (paper Alg. 1), per-block states, OPDLM_off and MDLM masking,
checked against naive per-token reconstructions written here."""

import dataclasses

import pytest
import torch

from opdlm_megatron.states import forward_mask, partially_masked_share, random_mask_states, select_states
from tests.distributed.student_data import synthetic_rollout

MASK = 999
BLOCK = 4


def naive_state(x0, valid, commit, k):
    """The answer before round k, token by token."""
    return [int(x0[i]) if bool(valid[i]) and int(commit[i]) < k else MASK for i in range(len(x0))]


@pytest.fixture(scope="module")
def result():
    return synthetic_rollout(vocab_size=200, block_size=BLOCK, batch_size=4, answer_len=11, seed=3)


def test_trajectory_state_is_a_uniform_non_terminal_round(result):
    g = torch.Generator().manual_seed(0)
    draws = 600
    hits = [dict() for _ in range(result.batch_size)]
    for _ in range(draws):
        xt = select_states(result, "trajectory", g, MASK)
        for b in range(result.batch_size):
            rounds = int(result.num_rounds[b])
            matches = [k for k in range(rounds + 1)
                       if naive_state(result.answer_ids[b], result.answer_valid[b], result.commit_step[b], k) == xt[b].tolist()]
            assert len(matches) == 1, (b, matches)
            k = matches[0]
            assert k < rounds, "the terminal state (all committed) must never be selected"
            hits[b][k] = hits[b].get(k, 0) + 1
    for b in range(result.batch_size):
        rounds = int(result.num_rounds[b])
        assert sorted(hits[b]) == list(range(rounds)), "every non-terminal round must be reachable"
        expected = draws / rounds
        for k, n in hits[b].items():  # 600 draws over <= 11 rounds: generous 5-sigma band
            assert abs(n - expected) < 5 * (expected * (1 - 1 / rounds)) ** 0.5, (b, k, n, expected)


def test_block_state_picks_one_of_each_blocks_own_rounds(result):
    g = torch.Generator().manual_seed(1)
    seen = {}
    for _ in range(300):
        xt = select_states(result, "block", g, MASK, block_size=BLOCK)
        for b in range(result.batch_size):
            length = int(result.answer_valid[b].sum())
            for start in range(0, length, BLOCK):
                sl = slice(start, min(start + BLOCK, length))
                block_rounds = sorted(set(result.commit_step[b, sl].tolist()))
                matches = [k for k in block_rounds
                           if naive_state(result.answer_ids[b], result.answer_valid[b], result.commit_step[b], k)[sl]
                           == xt[b, sl].tolist()]
                assert len(matches) == 1, (b, start, matches)
                assert (xt[b, sl] == MASK).any(), "a block state is never the fully revealed block"
                seen.setdefault((b, start), set()).add(matches[0])
            assert (xt[b, length:] == MASK).all()
    for (b, start), rounds in seen.items():
        sl = slice(start, min(start + BLOCK, int(result.answer_valid[b].sum())))
        assert rounds == set(result.commit_step[b, sl].tolist()), (b, start)


def test_selection_is_reproducible_from_the_generator(result):
    for mode in ("trajectory", "block"):
        a = select_states(result, mode, torch.Generator().manual_seed(5), MASK, block_size=BLOCK)
        b = select_states(result, mode, torch.Generator().manual_seed(5), MASK, block_size=BLOCK)
        assert torch.equal(a, b)


def test_forward_mask_per_block_rate(result):
    g = torch.Generator().manual_seed(2)
    x0, valid = result.answer_ids, result.answer_valid
    masked_total = t_total = 0.0
    for _ in range(200):
        xt, t = forward_mask(x0, valid, BLOCK, g, MASK)
        assert t.shape == x0.shape and bool((t >= 1e-3).all()) and bool((t <= 1).all())
        for start in range(0, x0.shape[1], BLOCK):  # one t per block
            blk = t[:, start:start + BLOCK]
            assert torch.equal(blk, blk[:, :1].expand_as(blk))
        assert torch.equal(xt[~valid], x0[~valid]), "padding is never masked"
        kept = (xt != MASK) & valid
        assert torch.equal(xt[kept], x0[kept])
        masked_total += float(((xt == MASK) & valid).sum())
        t_total += float(t[valid].sum())
    assert abs(masked_total / t_total - 1.0) < 0.05  # E[#masked] = sum of t over valid tokens


def test_forward_mask_per_sequence_rate(result):
    """Paper eq. (2) / (6): one t per sequence; E[#masked] = sum of t over valid tokens; t ~ U(eps, 1)."""
    g = torch.Generator().manual_seed(5)
    x0, valid = result.answer_ids, result.answer_valid
    masked_total = t_total = 0.0
    ts = []
    for _ in range(300):
        xt, t = forward_mask(x0, valid, BLOCK, g, MASK, per="sequence")
        assert torch.equal(t, t[:, :1].expand_as(t))  # constant along each row
        assert torch.equal(xt[~valid], x0[~valid])
        masked_total += float(((xt == MASK) & valid).sum())
        t_total += float(t[valid].sum())
        ts += t[:, 0].tolist()
    assert abs(masked_total / t_total - 1.0) < 0.05
    assert abs(sum(ts) / len(ts) - 0.5) < 0.03 and min(ts) >= 1e-3


def test_partially_masked_share_matches_brute_force(result):
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        xt = select_states(result, "trajectory", g, MASK)
        supervised = (xt == MASK) & result.answer_valid
        total = partial = 0
        for b in range(result.batch_size):
            for i in range(xt.shape[1]):
                if not supervised[b, i]:
                    continue
                start = i - i % BLOCK
                block = [j for j in range(start, min(start + BLOCK, xt.shape[1])) if result.answer_valid[b, j]]
                revealed = any(xt[b, j] != MASK for j in block)
                total += 1
                partial += int(revealed)
        got = partially_masked_share(xt, supervised, result.answer_valid, BLOCK, MASK)
        assert (total == 0 and got != got) or got == pytest.approx(partial / total)


def test_random_mask_states_masks_only_valid_answer_tokens(result):
    xt = random_mask_states(result, torch.Generator().manual_seed(4), MASK)
    valid = result.answer_valid
    assert torch.equal(xt[~valid], result.answer_ids[~valid])
    kept = (xt != MASK) & valid
    assert torch.equal(xt[kept], result.answer_ids[kept])
    assert ((xt == MASK) & valid).any()


def test_bad_inputs_raise_clear_errors(result):
    g = torch.Generator()
    with pytest.raises(ValueError, match="'random'"):
        select_states(result, "random", g, MASK)
    with pytest.raises(ValueError, match="block_size"):
        select_states(result, "block", g, MASK)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        select_states(result, "block", g, MASK, block_size=0)
    broken = dataclasses.replace(result, commit_step=result.commit_step.masked_fill(result.answer_valid, -1))
    with pytest.raises(ValueError, match="commit_step >= 0"):
        select_states(broken, "trajectory", g, MASK)
    with pytest.raises(ValueError, match="eps"):
        forward_mask(result.answer_ids, result.answer_valid, BLOCK, g, MASK, eps=1.5)
