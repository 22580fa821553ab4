"""State selection: trajectory states (paper Alg. 1), per-block states, OPDLM_off and MDLM masking,
checked against naive per-token reconstructions written here."""

import dataclasses

import pytest
import torch

from opdlm_megatron.distill.states import forward_mask, partially_masked_share, random_mask_states, select_states
from tests.distributed.student_data import authors_rounds as _authors_rounds, synthetic_rollout

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


# ----------------------------------------------------------------------------- all_rounds
def authors_rounds(x0, valid, commit, block, keep):
    return _authors_rounds(x0, valid, commit, block, keep, MASK)


def handmade_rollout():
    """Ties inside blocks, a short last block, an EOS inside a block followed by more tokens, a one-token
    answer and an answer that is one round per block."""
    from opdlm_megatron.rollout.types import RolloutResult

    eos = 2
    answers = [
        # block 0: rounds 0,0,1,2 (a tie); block 1: 3,3,3,3 (one round); block 2 (short): 4,5
        ([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [1, 0, 0, 2, 3, 3, 3, 3, 5, 4]),
        # EOS at position 5 inside block 1, more tokens after it
        ([20, 21, 22, 23, 24, eos, 26, 27], [0, 0, 1, 1, 3, 2, 2, 4]),
        ([30], [0]),
        ([40, 41, 42, 43, 44, 45, 46, 47], [0, 0, 0, 0, 1, 1, 1, 1]),
    ]
    width = max(len(a) for a, _ in answers)
    ids = torch.zeros(len(answers), width, dtype=torch.long)
    commit = torch.full((len(answers), width), -1, dtype=torch.long)
    valid = torch.zeros(len(answers), width, dtype=torch.bool)
    for b, (a, c) in enumerate(answers):
        ids[b, :len(a)], commit[b, :len(a)], valid[b, :len(a)] = torch.tensor(a), torch.tensor(c), True
    prompts = torch.full((len(answers), 2), 5, dtype=torch.long)
    rounds = (commit.amax(-1) + 1)
    return RolloutResult(prompts, torch.ones_like(prompts, dtype=torch.bool), ids, valid, commit, rounds,
                         torch.ones(len(answers), dtype=torch.bool), int(rounds.sum())), eos


@pytest.mark.parametrize("include_eos", [True, False])
def test_all_rounds_equal_the_authors_rounds_on_handmade_trajectories(include_eos):
    from opdlm_megatron.model.losses import answer_loss_mask
    from opdlm_megatron.distill.states import all_round_states, commit_ranks

    rollout, eos = handmade_rollout()
    keep = answer_loss_mask(rollout.answer_ids, rollout.answer_valid, [eos], include_eos)
    source, xt = all_round_states(rollout, BLOCK, MASK, keep=keep)
    assert torch.equal(source, source.sort().values), "rows come answer by answer"
    for b in range(rollout.batch_size):
        expected = authors_rounds(rollout.answer_ids[b], rollout.answer_valid[b], rollout.commit_step[b], BLOCK, keep[b])
        got = xt[source == b].tolist()
        assert got == expected, (b, got, expected)
    # the hand-made rows, spelled out: answer 0 has 3 rounds (block 0's three distinct rounds)
    assert xt[source == 0].tolist()[1] == [MASK, 11, 12, MASK, 14, 15, 16, 17, MASK, 19]
    assert (source == 3).sum() == 1 and (source == 2).sum() == 1
    ranks = commit_ranks(rollout, BLOCK)
    assert ranks[0].tolist() == [1, 0, 0, 2, 0, 0, 0, 0, 1, 0]
    # the EOS answer: block 0 has two rounds, block 1 holds 24, EOS, 26, 27 with rounds 3, 2, 2, 4 (ranks 1,
    # 0, 0, 2); round 2 masks only 27, after the EOS, which carries no loss: that row is dropped
    assert (source == 1).sum() == 2


def test_all_rounds_equal_the_authors_rounds_on_random_trajectories(result):
    from opdlm_megatron.distill.states import all_round_states

    for seed in range(5):
        rollout = synthetic_rollout(vocab_size=200, block_size=BLOCK, batch_size=6, answer_len=13, seed=seed)
        source, xt = all_round_states(rollout, BLOCK, MASK)
        for b in range(rollout.batch_size):
            expected = authors_rounds(rollout.answer_ids[b], rollout.answer_valid[b], rollout.commit_step[b], BLOCK,
                                      rollout.answer_valid[b])
            assert xt[source == b].tolist() == expected
            # every state of every block appears exactly once: block states over the rows = its distinct rounds
            length = int(rollout.answer_valid[b].sum())
            for start in range(0, length, BLOCK):
                sl = slice(start, min(start + BLOCK, length))
                partial = {tuple(row[sl].tolist()) for row in xt[source == b] if (row[sl] == MASK).any()}
                assert len(partial) == len(set(rollout.commit_step[b, sl].tolist()))
