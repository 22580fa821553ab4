"""Context parallelism's column split (model/context_parallel.py) on its own: the shares partition the
row, the gather puts keys back in column order, the masks of the shares are the rows of the whole
mask, and the zigzag balances the attention work of OPD rows. Training at CP=2 against TP=1 is in
tests/test_trainer.py (every objective, also with TP/SP/PP and real rollouts) and test_megatron_lm.py."""

import pytest
import torch

from opdlm_megatron.model import masks
from opdlm_megatron.model.context_parallel import ColumnSplit
from tests.distributed.student_data import synthetic_rollout


@pytest.mark.parametrize("size", [2, 4])
def test_shares_partition_the_row_and_unzigzag_restores_column_order(size):
    seq = 8 * size
    splits = [ColumnSplit.zigzag(seq, rank, size) for rank in range(size)]
    owned = torch.cat([s.local for s in splits])
    assert sorted(owned.tolist()) == list(range(seq))  # every column on exactly one rank
    for s in splits:
        assert s.local.numel() == seq // size
        assert torch.equal(s.position[s.local], torch.arange(seq // size))
        assert int((s.position >= 0).sum()) == seq // size
    # all_gather concatenates the ranks' shares; unzigzag puts every column back in its place
    assert torch.equal(owned[splits[0].unzigzag], torch.arange(seq))
    with pytest.raises(ValueError, match="do not split into 2 x 4 equal chunks"):
        ColumnSplit.zigzag(12, 0, 4)


def _opd_layout(answer_len=64, prompt_len=32, block=4):
    rollout = synthetic_rollout(300, block, batch_size=2, prompt_len=prompt_len, answer_len=answer_len, seed=1)
    batch = masks.opd_training_batch(rollout.prompt_ids, rollout.prompt_valid, rollout.answer_ids,
                                     rollout.answer_ids, rollout.answer_valid, block)
    return batch.layout


def test_share_masks_are_rows_of_the_whole_mask():
    layout = _opd_layout()
    whole = layout.dense_mask()
    for rank in range(2):
        split = ColumnSplit.zigzag(layout.seq_len, rank, 2)
        queries, keys = split.layouts(layout)
        assert torch.equal(queries.dense_mask(keys), whole[:, :, split.local])


@pytest.mark.parametrize("size,zigzag_at_most,contiguous_at_least", [(2, 1.05, 1.2), (4, 1.45, 2.5)])
def test_zigzag_balances_the_attended_pairs_of_long_opd_rows(size, zigzag_at_most, contiguous_at_least):
    """Long [prompt | x0 | xt] rows (answers of 256 tokens) are back-heavy (causal prompt and x0; each xt
    column attends the whole prefix), so contiguous shares give the last rank the most work; zigzag
    pairs an early chunk with a late one. Measured: max/min attended pairs over the ranks 1.01 vs 1.23
    at CP 2, 1.39 vs 2.67 at CP 4. (Short, padded rows can come out the other way: 2.76 vs 1.70 at
    CP 4 for 64-token answers; CP is for long rows.)"""
    layout = _opd_layout(answer_len=256)
    allowed = layout.allowed().sum(0).sum(-1).float()  # attended keys per query column, over the batch
    seq = layout.seq_len
    zigzag = [float(allowed[ColumnSplit.zigzag(seq, r, size).local].sum()) for r in range(size)]
    contiguous = [float(allowed[r * seq // size:(r + 1) * seq // size].sum()) for r in range(size)]
    assert max(contiguous) / min(contiguous) > contiguous_at_least, contiguous
    assert max(zigzag) / min(zigzag) < zigzag_at_most, zigzag
