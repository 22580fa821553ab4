"""benchmarks/rollout_throughput.py --quick: every part runs (batch-1 engine / naive / HF, the
forward breakdown, batch throughput), the engine's tokens equal the naive decoder's, and the last
line has the decoding-speed issue's fixed form. Speed itself is not asserted (benchmarks, not tests)."""

import re

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
