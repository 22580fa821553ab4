"""Attention masks equal brute-force definitions; FlexAttention BlockMasks equal the dense masks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opdlm_megatron.model import masks


# ----------------------------------------------------------------- brute-force reference definitions
def brute_block_causal(lengths, seq_len, block_size, prompt_lengths=None):
    """[B, S, S] allowed-matrix by explicit loops; rows are left-padded to seq_len."""
    out = torch.zeros(len(lengths), seq_len, seq_len, dtype=torch.bool)
    for r, n in enumerate(lengths):
        pad = seq_len - n

        def block(i):
            if prompt_lengths is None:
                return i // block_size
            p = prompt_lengths[r]
            if i < p:
                return i // block_size
            return -(-p // block_size) + (i - p) // block_size

        for qc in range(seq_len):
            for kc in range(seq_len):
                if qc < pad:
                    out[r, qc, kc] = True  # padding queries attend everywhere
                elif kc >= pad:
                    out[r, qc, kc] = block(kc - pad) <= block(qc - pad)
    return out


def brute_opd(prompt_lens, answer_lens, plen_max, alen_max, block_size):
    """[B, S, S] allowed-matrix of the [prompt | x0 | xt] layout: the packed definition with one copy."""
    return brute_packed_opd(prompt_lens, answer_lens, [1] * len(prompt_lens), plen_max, alen_max, 1, block_size)


def left_padded_valid(lengths, seq_len):
    return torch.tensor([[c >= seq_len - n for c in range(seq_len)] for n in lengths])


def right_padded_valid(lengths, seq_len):
    return torch.tensor([[c < n for c in range(seq_len)] for n in lengths])


# ---------------------------------------------------------------------------------------- tests
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_block_causal_matches_brute_force(data):
    seq_len = data.draw(st.integers(1, 14))
    batch = data.draw(st.integers(1, 3))
    lengths = data.draw(st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch))
    block = data.draw(st.integers(1, seq_len + 2))
    use_prompt = data.draw(st.booleans())
    prompt_lengths = [data.draw(st.integers(1, n)) for n in lengths] if use_prompt else None
    valid = left_padded_valid(lengths, seq_len)
    layout = masks.block_causal_layout(valid, block, torch.tensor(prompt_lengths) if use_prompt else None)
    expected = brute_block_causal(lengths, seq_len, block, prompt_lengths)
    assert torch.equal(layout.allowed(), expected)
    assert torch.equal(layout.dense_mask(), ~expected[:, None])


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_causal_and_bidirectional_are_block_causal_extremes(data):
    seq_len = data.draw(st.integers(1, 12))
    lengths = data.draw(st.lists(st.integers(1, seq_len), min_size=1, max_size=3))
    valid = left_padded_valid(lengths, seq_len)
    assert torch.equal(masks.causal_layout(valid).allowed(), brute_block_causal(lengths, seq_len, 1))
    assert torch.equal(masks.bidirectional_layout(valid).allowed(), brute_block_causal(lengths, seq_len, seq_len))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_opd_layout_matches_brute_force(data):
    batch = data.draw(st.integers(1, 3))
    plen_max = data.draw(st.integers(1, 6))
    alen_max = data.draw(st.integers(1, 9))
    block = data.draw(st.integers(1, 5))
    prompt_lens = data.draw(st.lists(st.integers(1, plen_max), min_size=batch, max_size=batch))
    answer_lens = data.draw(st.lists(st.integers(0, alen_max), min_size=batch, max_size=batch))
    prompt_valid = left_padded_valid(prompt_lens, plen_max)
    answer_valid = right_padded_valid(answer_lens, alen_max)
    x0 = torch.randint(0, 50, (batch, alen_max))
    opd = masks.opd_training_batch(torch.randint(0, 50, (batch, plen_max)), prompt_valid, x0, x0.clone(),
                                   answer_valid, block)
    # block ids of prompts in the OPD layout tile from the prompt start; the answer starts a fresh block
    assert torch.equal(opd.layout.allowed(), brute_opd(prompt_lens, answer_lens, plen_max, alen_max, block))
    # xt shares positions with x0, and positions continue from the prompt
    pos = opd.position_ids
    assert torch.equal(pos[:, plen_max:plen_max + alen_max], pos[:, plen_max + alen_max:])
    for r, p in enumerate(prompt_lens):
        assert pos[r, plen_max - 1] == p - 1 and pos[r, plen_max] == p


def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def brute_packed_opd(prompt_lens, answer_lens, copies_per_row, plen_max, alen_max, copies, block_size):
    """[B, S, S] allowed-matrix of the packed [prompt | x0 | xt_1 | .. | xt_R] layout, written from its
    definition: copy r of block j sees the prompt, x0 of earlier blocks and copy r of block j only. With
    several copies they lie back to back at the row's answer length a (copy r at P + A + r a), one copy
    at P + A."""
    width = alen_max if copies == 1 else max(1, max(a * n for a, n in zip(answer_lens, copies_per_row)))
    seq = plen_max + alen_max + width
    out = torch.zeros(len(prompt_lens), seq, seq, dtype=torch.bool)
    for row, (p, a, n) in enumerate(zip(prompt_lens, answer_lens, copies_per_row)):
        stride = alen_max if copies == 1 else a

        def describe(c):  # -> (kind, copy, index) or None for padding and the row's missing copies
            if c < plen_max:
                return ("prompt", 0, c - (plen_max - p)) if c >= plen_max - p else None
            if c < plen_max + alen_max:
                i = c - plen_max
                return ("x0", 0, i) if i < a else None
            offset = c - plen_max - alen_max
            if stride == 0 or offset // stride >= n or offset % stride >= a:
                return None
            return ("xt", 1 + offset // stride, offset % stride)

        for qc in range(seq):
            q = describe(qc)
            for kc in range(seq):
                k = describe(kc)
                if q is None:
                    out[row, qc, kc] = True
                    continue
                if k is None:
                    continue
                (qkind, qr, qi), (kkind, kr, ki) = q, k
                if qkind == "prompt":
                    ok = kkind == "prompt" and ki // block_size <= qi // block_size
                elif qkind == "x0":
                    ok = kkind == "prompt" or (kkind == "x0" and ki // block_size <= qi // block_size)
                else:
                    ok = (kkind == "prompt" or (kkind == "x0" and ki // block_size < qi // block_size)
                          or (kkind == "xt" and kr == qr and ki // block_size == qi // block_size))
                out[row, qc, kc] = ok
    return out


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_packed_opd_layout_matches_brute_force_and_each_copy_alone(data):
    batch = data.draw(st.integers(1, 3))
    plen_max = data.draw(st.integers(1, 5))
    alen_max = data.draw(st.integers(1, 7))
    copies = data.draw(st.integers(1, 4))
    block = data.draw(st.integers(1, 4))
    shift = data.draw(st.booleans())
    prompt_lens = data.draw(st.lists(st.integers(1, plen_max), min_size=batch, max_size=batch))
    answer_lens = data.draw(st.lists(st.integers(0, alen_max), min_size=batch, max_size=batch))
    copies_per_row = data.draw(st.lists(st.integers(1, copies), min_size=batch, max_size=batch))
    copies_per_row[0] = copies  # some row has every copy (the builder's R is the most any row has)
    prompt = torch.randint(0, 50, (batch, plen_max))
    prompt_valid, answer_valid = left_padded_valid(prompt_lens, plen_max), right_padded_valid(answer_lens, alen_max)
    x0 = torch.randint(0, 50, (batch, alen_max))
    xt = torch.randint(0, 50, (batch, copies, alen_max))
    copy_valid = torch.arange(copies)[None] < torch.tensor(copies_per_row)[:, None]
    packed = masks.opd_packed_training_batch(prompt, prompt_valid, x0, xt, copy_valid, answer_valid, block, shift)
    allowed = packed.layout.allowed()
    assert torch.equal(allowed, brute_packed_opd(prompt_lens, answer_lens, copies_per_row, plen_max, alen_max,
                                                 copies, block))
    # each real copy sees, column for column, what it sees as the xt of opd_training_batch's row of its own
    for r in range(copies):
        alone = masks.opd_training_batch(prompt, prompt_valid, x0, xt[:, r], answer_valid, block, shift)
        for b in range(batch):
            a = answer_lens[b]
            if r >= copies_per_row[b] or a == 0:
                continue
            # the packed columns of alone's row: prompt and x0 where they are, alone's xt at copy r
            own = torch.cat([torch.arange(plen_max + alen_max), packed.xt_columns[b, r, :a]])
            queries = packed.xt_columns[b, r, :a]
            alone_keys = torch.arange(plen_max + alen_max + a)
            assert torch.equal(allowed[b][queries][:, own], alone.layout.allowed()[b][alone.xt_columns[b, :a]][:, alone_keys])
            assert allowed[b][queries].sum() == allowed[b][queries][:, own].sum()  # nothing of another copy
            assert torch.equal(packed.input_ids[b, queries], xt[b, r, :a])
            # the prediction column holds the same token and position as in the row of its own
            assert torch.equal(packed.input_ids[b, packed.prediction_columns[b, r, :a]],
                               alone.input_ids[b, alone.prediction_columns[b, :a]])
            assert torch.equal(packed.position_ids[b, packed.prediction_columns[b, r, :a]],
                               alone.position_ids[b, alone.prediction_columns[b, :a]])
    if copies > 1 and _has_flex():
        dense_from_flex = packed.layout.flex_block_mask(block_size=4).to_dense()
        tiles = -(-allowed.shape[-1] // 4)
        for b in range(batch):
            for i in range(tiles):
                for j in range(tiles):
                    assert bool(dense_from_flex[b, 0, i, j]) == bool(allowed[b, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].any())


def test_prediction_columns_with_and_without_shift():
    prompt_valid = torch.tensor([[False, True, True]])
    answer_valid = torch.ones(1, 6, dtype=torch.bool)
    ids = torch.arange(6)[None]
    plain = masks.opd_training_batch(torch.ones(1, 3, dtype=torch.long), prompt_valid, ids, ids, answer_valid, 4)
    assert plain.prediction_columns.tolist() == [[9, 10, 11, 12, 13, 14]]  # xt columns 3 + 6 + i
    shifted = masks.opd_training_batch(torch.ones(1, 3, dtype=torch.long), prompt_valid, ids, ids, answer_valid, 4,
                                       logit_shift=True)
    # answer 0 <- last prompt column 2; answers 1..3 <- xt of i-1; answer 4 (new block) <- x0 of answer 3 (column 6)
    assert shifted.prediction_columns.tolist() == [[2, 9, 10, 11, 6, 13]]


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_flex_block_mask_equals_dense(data):
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = data.draw(st.integers(1, 2))
    plen_max = data.draw(st.integers(1, 5))
    alen_max = data.draw(st.integers(1, 7))
    block = data.draw(st.integers(1, 4))
    prompt_lens = data.draw(st.lists(st.integers(1, plen_max), min_size=batch, max_size=batch))
    answer_lens = data.draw(st.lists(st.integers(0, alen_max), min_size=batch, max_size=batch))
    x0 = torch.zeros(batch, alen_max, dtype=torch.long)
    opd = masks.opd_training_batch(torch.zeros(batch, plen_max, dtype=torch.long),
                                   left_padded_valid(prompt_lens, plen_max), x0, x0,
                                   right_padded_valid(answer_lens, alen_max), block)
    block_mask = opd.layout.flex_block_mask(block_size=4)
    dense_from_flex = block_mask.to_dense()  # [B, 1, nq, nk] tile occupancy
    allowed = opd.layout.allowed()
    # every allowed pair lies in a tile the BlockMask keeps; every fully masked tile is dropped
    seq = allowed.shape[-1]
    tiles = -(-seq // 4)
    for b in range(batch):
        for i in range(tiles):
            for j in range(tiles):
                tile_has_allowed = bool(allowed[b, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].any())
                assert bool(dense_from_flex[b, 0, i, j]) == tile_has_allowed


def test_kv_cached_continuation_mask_is_a_slice_of_the_full_mask():
    valid = left_padded_valid([10, 7], 10)
    full = masks.block_causal_layout(valid, 3, torch.tensor([4, 2]))
    cached, current = full.columns(0, 6), full.columns(6, 9)
    keys = masks.AttentionLayout.cat([cached, current])
    assert torch.equal(current.allowed(keys), full.allowed()[:, 6:9, :9])


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_block_size_raises(bad):
    with pytest.raises(ValueError, match="block_size"):
        masks.block_causal_layout(torch.ones(1, 4, dtype=torch.bool), bad)


def test_bad_layout_inputs_raise():
    with pytest.raises(ValueError, match="valid must be"):
        masks.causal_layout(torch.ones(4, dtype=torch.bool))
    pv = torch.tensor([[True, False]])  # right-padded prompt: wrong side
    av = torch.ones(1, 2, dtype=torch.bool)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="left-padded"):
        masks.opd_training_batch(ids, pv, ids, ids, av, 2)
    with pytest.raises(ValueError, match="right-padded"):
        masks.opd_training_batch(ids, torch.ones(1, 2, dtype=torch.bool), ids, ids, torch.tensor([[False, True]]), 2)
    with pytest.raises(ValueError, match="one shape"):
        masks.opd_training_batch(ids, av, ids, torch.zeros(1, 3, dtype=torch.long), av, 2)
