"""benchmarks/rollout_throughput.py --quick: every part runs (batch-1 engine / naive / HF, the
forward breakdown, batch throughput), the engine's tokens equal the naive decoder's, and the last
line has the decoding-speed issue's fixed form. Speed itself is not asserted (benchmarks, not tests)."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_main_job import _python


def test_rollout_throughput_quick():
    stdout = _python(str(REPO_ROOT / "benchmarks" / "rollout_throughput.py"), "--quick", "--batch-prompts", "3")
    assert "same tokens as (a): True" in stdout, stdout
    breakdown = next(line for line in stdout.splitlines() if line.startswith("one cached block-4 forward"))
    for part in ("weight matmuls", "output layer", "attention", "CPU shim", "everything else"):
        assert part in breakdown, breakdown
    assert "batch 3 (prompt lengths" in stdout
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_naive=[\d.]+ speedup_vs_ar=[\d.]+ tokens_per_forward=[\d.]+ "
                        r"forward_over_ar_step=[\d.]+ batch32_vs_hf=[\d.]+", last), last


def test_gpu_rollout_code_path_on_cpu():
    """benchmarks/gpu_rollout.py --quick --device cpu: both HF families (Llama, Qwen3 with QK-norm) against
    the engine at 1, 2 and 4 tokens per forward; the script itself checks that every timed answer has the
    full length in new_tokens / k forwards. Without a GPU, the default --device cuda skips in one line."""
    script = str(REPO_ROOT / "benchmarks" / "gpu_rollout.py")
    stdout = _python(script, "--quick", "--device", "cpu")
    assert "tiny_llama: engine forward" in stdout and "tiny_qwen3: engine forward" in stdout
    assert stdout.count("every answer 8 tokens") == 4
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"gpu_rollout device=cpu engine_over_hf_b1_k1=[\d.]+ engine_over_hf_b1_k4=[\d.]+ "
                        r"engine_over_hf_b2_k1=[\d.]+ engine_over_hf_b2_k4=[\d.]+", last), last
    import torch

    if not torch.cuda.is_available():
        skipped = _python(script).strip().splitlines()
        assert len(skipped) == 1 and skipped[0].startswith("gpu_rollout: skipped: no CUDA GPU"), skipped


def test_rollout_throughput_task_mode_records_what_it_scored(tmp_path):
    """--task on a tiny model exported to HF: the per-family line, and a JSON record whose accuracies are
    the family's own scorer applied to the answers it stores (rescored here), whose other families'
    records survive a second run, and whose bad --task-options are refused by name."""
    from opdlm_megatron.eval.tasks import TaskSpec, load_task
    from opdlm_megatron.tools.convert_megatron_to_hf import export
    from tests.helpers import save_tiny_student

    ckpt = save_tiny_student(tmp_path / "tiny", seed=3, max_sequence_length=256)
    export(ckpt, str(tmp_path / "hf"))
    script = str(REPO_ROOT / "benchmarks" / "rollout_throughput.py")
    out = tmp_path / "real_model.json"
    out.write_text(json.dumps({"other_family": {"student_acc": 0.5}}))
    common = ["--checkpoint", ckpt, "--hf-dir", str(tmp_path / "hf"), "--trained-checkpoint", ckpt,
              "--task-prompts", "3", "--task-batch", "2", "--new-tokens", "8", "--json-out", str(out)]
    stdout = _python(script, "--task", "opdlm/count_up", *common)
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"real_model family=opdlm/count_up teacher_acc=[\d.]+ student_acc=[\d.]+ "
                        r"student_tpf=[\d.]+ speedup_vs_ar=[\d.]+", last), last
    records = json.loads(out.read_text())
    assert records["other_family"] == {"student_acc": 0.5}
    record = records["opdlm/count_up"]
    items = load_task(TaskSpec("opdlm/count_up", num_samples=3, seed=999))
    assert [e["question"] for e in record["examples"]] == [item.question for item in items]
    for who in ("teacher", "student"):
        rescored = sum(item.score(e[who]) for item, e in zip(items, record["examples"])) / 3
        assert record[f"{who}_acc"] == pytest.approx(rescored)
    assert set(record["batches"]) == {"1", "2"} and record["student_tpf"] == record["batches"]["1"]["tpf"]
    # tokens per forward of one sequence at every batch size: batching the same greedy answers changes
    # the forwards a batch runs, not the rounds each sequence takes
    assert record["batches"]["2"]["tpf"] == pytest.approx(record["batches"]["1"]["tpf"])
    assert f"student_tpf={record['student_tpf']:.2f}" in last

    proc = subprocess.run([sys.executable, script, "--task", "opdlm/count_up", "--task-options", "[1]", *common],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2 and "--task-options must be a JSON object, got '[1]'" in proc.stderr
    assert "Traceback" not in proc.stderr
