"""Memory of the teacher's targets at a large vocabulary: full logits vs the top-k the loss reads.

    python benchmarks/teacher_memory.py [--vocab 151936 --answer-tokens 4096 --top-k 16]

A small randomly initialised teacher with Qwen3's vocabulary (151,936 rows) scores one answer of
``--answer-tokens`` tokens (every position supervised, as in a fully masked state). With
``loss.top_k`` unset the trainer keeps the teacher's full vocab-parallel logits of every supervised
position; with ``loss.top_k = k`` only their top-k values and ids and the log-normaliser
(``TeacherTopK``). Both go through ``FrozenTeacher.targets``. Reported: the bytes the targets hold
and the process's peak resident memory growth during each call (polled), full first. The peak is
transient and set by ``loss.chunk_tokens`` (the output layer and the top-k run that many tokens x V
at a time, with fp32 copies), not by the answer length.

The last line reads ``full_mb=X topk_mb=Y bytes_ratio=Z peak_rss_ratio=W`` (goal Z <= 0.01).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.config.model import ModelConfig  # noqa: E402
from opdlm_megatron.model.build import build_model  # noqa: E402
from opdlm_megatron.runtime.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.distill.teacher import FrozenTeacher  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--answer-tokens", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="teacher dtype (the full logits are kept in it)")
    return p.parse_args()


class PeakRSS:
    """Peak resident-set growth of this process while the context is open (polled every 2 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def main() -> None:
    args = parse_args()
    config = ModelConfig(num_layers=2, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden, num_attention_heads=2,
                         vocab_size=args.vocab, max_sequence_length=args.prompt_tokens + args.answer_tokens + 8,
                         eos_token_ids=[2], params_dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, args.vocab, (1, args.prompt_tokens), generator=g)
    answer = torch.randint(3, args.vocab, (1, args.answer_tokens), generator=g)
    valid_p, valid_a = torch.ones_like(prompt, dtype=torch.bool), torch.ones_like(answer, dtype=torch.bool)
    with initialize_runtime(device="cpu", seed=0):
        teacher = FrozenTeacher(build_model(config, "teacher"), config, config)
        results = {}
        for name, k in (("full", None), ("topk", args.top_k)):
            with PeakRSS() as rss:
                targets = teacher.targets(prompt, valid_p, answer, valid_a, valid_a, micro_batch_size=1, top_k=k)
            results[name] = (targets.nbytes, rss.growth)
            del targets
    full, topk = results["full"], results["topk"]
    print(f"vocab={args.vocab} answer_tokens={args.answer_tokens} teacher_dtype={args.dtype} top_k={args.top_k}")
    print(f"full logits: {full[0] / 2**20:.1f} MiB held, peak RSS +{full[1] / 2**20:.1f} MiB")
    print(f"top-{args.top_k}: {topk[0] / 2**20:.3f} MiB held, peak RSS +{topk[1] / 2**20:.1f} MiB "
          "(transient: fp32 copies of one chunk of loss.chunk_tokens x V logits)")
    print(f"full_mb={full[0] / 2**20:.1f} topk_mb={topk[0] / 2**20:.3f} bytes_ratio={topk[0] / full[0]:.5f} "
          f"peak_rss_ratio={topk[1] / max(full[1], 1):.3f}")


if __name__ == "__main__":
    main()
