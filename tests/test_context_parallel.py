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


def test_long_context_benchmark_quick():
    """benchmarks/long_context.py --quick (1,024 columns, torchrun, 2 ranks): at CP=2 a rank keeps about
    half the activation bytes of CP=1, and the planner's count follows the measured bytes."""
    import re
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "long_context.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"columns=1024 cp2_over_cp1_activation_bytes=([0-9.]+) step_time_ratio=([0-9.]+) "
                     r"estimate_ratio=([0-9.]+)", last)
    assert m, last
    measured, _, estimated = (float(x) for x in m.groups())
    assert 0.4 < measured <= 0.6 and estimated == pytest.approx(measured, abs=0.05), last
    for line in proc.stdout.splitlines()[:-1]:  # each rank's count within 15% of its measured bytes
        kept, count = (float(x) for x in re.search(r"kept for backward\s+([0-9.]+) MiB \(count\s+([0-9.]+)", line).groups())
        assert count == pytest.approx(kept, rel=0.15), line


@pytest.mark.distributed
def test_flex_attention_under_context_parallelism_forward(tmp_path):
    """The CP path with FlexAttention (its BlockMask of a rank's query rows against every key): the
    student step's loss, forward only (no FlexAttention backward on CPU), equals dense attention's at
    CP=2 and both equal CP=1's."""
    import json

    from tests.conftest import run_torchrun

    out = tmp_path / "losses.json"
    run_torchrun("context_parallel_flex.py", f"--out={out}")
    losses = json.loads(out.read_text())
    reference = losses["dense/cp1"]
    assert reference > 0
    for key in ("flex/cp1", "dense/cp2", "flex/cp2"):
        assert losses[key] == pytest.approx(reference, rel=1e-5), (key, losses)
