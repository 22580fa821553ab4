"""One OPD training step vs the sum of its parts, and the student's achieved FLOP/s.

    python benchmarks/opd_step.py [--layers 4 --hidden 256 --prompts 4 --rollout-len 32]
    torchrun --nproc-per-node 2 benchmarks/opd_step.py --tp 2

Builds a randomly initialised student/teacher pair, runs warm-up steps, then times (a) whole
training steps (``Trainer.train_step``) and (b) each phase alone on the same inputs: rollout
(block-diffusion engine), teacher forward, student forward/backward, optimizer step. Goal:
``step_over_parts <= 1.10`` (the loop adds little beyond its parts). The student's fwd/bwd FLOP/s
(6 x parameters x tokens of ``[prompt | x0 | xt]`` plus attention) is compared with a dense fp32
matmul timed in the same run. The last line reads ``step_over_parts=X student_flops_vs_matmul=Y``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron import student as student_step  # noqa: E402
from opdlm_megatron.data import Sample  # noqa: E402
from opdlm_megatron.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.train_config import train_config_from_dict  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--rollout-len", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto")
    return p.parse_args()


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def matmul_flops(n: int, device, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    seconds, _ = timed(lambda: a @ b, repeats)
    return 2 * n ** 3 / seconds


def main() -> None:
    args = parse_args()
    from opdlm_megatron.trainer import Trainer

    model_config = dict(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        num_attention_heads=args.heads, num_query_groups=max(1, args.heads // 2), vocab_size=args.vocab,
        max_sequence_length=max(256, 2 * (args.prompt_len + args.rollout_len)), eos_token_ids=[2], block_size=4,
    )
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist())
               for _ in range(4 * args.prompts)]
    run_dir = tempfile.mkdtemp(prefix="opd_step_")
    cfg = train_config_from_dict(dict(
        objective="opd", steps=100, prompts_per_step=args.prompts, micro_batch_size=args.micro_batch_size,
        run_dir=run_dir, model=dict(random_init=True, model_config=model_config),
        parallel=dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, device=args.device),
        data=dict(source="token_ids", path="unused"),
        # threshold 1.0 with a random model: the rollout always runs the full length (stable timings)
        rollout=dict(threshold=1.0, temperature=1.0),
        curriculum=dict(min_length=args.rollout_len, max_length=args.rollout_len, warmup_steps=1),
        checkpoint=dict(resume=False), logging=dict(progress_bar=False),
    ))
    with initialize_runtime(args.tp, args.pp, device=args.device, seed=0) as rt:
        trainer = Trainer(cfg, rt, samples=samples)
        for step in range(2):  # warm-up
            trainer.train_step(step)
        step_time, _ = timed(lambda: trainer.train_step(2), args.repeats)

        batch = trainer._rollout(3, samples[: trainer.rows_per_rank])
        rollout_time, _ = timed(lambda: trainer._rollout(3, samples[: trainer.rows_per_rank]), args.repeats)
        teacher_time, _ = timed(lambda: trainer._teacher_targets(batch), args.repeats)
        r = batch.result

        def student():
            trainer.model.zero_grad_buffer()
            return student_step.student_forward_backward(
                trainer.model, trainer.config, r, batch.xt, batch.targets, "distill", trainer.divergence,
                cfg.micro_batch_size, end_of_turn_ids=trainer.end_of_turn_ids)

        student_time, _ = timed(student, args.repeats)
        optimizer_time, _ = timed(lambda: trainer.optimizer.step(), args.repeats)
        parts = rollout_time + teacher_time + student_time + optimizer_time

        params = sum(p.numel() for p in trainer.student.parameters())
        tokens = r.batch_size * (r.prompt_ids.shape[1] + 2 * r.answer_ids.shape[1])
        seq = r.prompt_ids.shape[1] + 2 * r.answer_ids.shape[1]
        # dense attention scores + values: 2 matmuls of [S, S, d] per layer, x3 for fwd+bwd
        attention = 3 * 2 * 2 * r.batch_size * seq * seq * args.hidden * args.layers
        student_flops = (6 * params * tokens + attention) / student_time
        matmul = matmul_flops(1024, rt.device)
        trainer.close()

        if rt.rank == 0:
            print(f"device={rt.device} params={params} rows={r.batch_size} prompt={r.prompt_ids.shape[1]} "
                  f"answer={r.answer_ids.shape[1]} forwards={r.num_forward_passes}")
            print(f"step={step_time:.3f}s parts: rollout={rollout_time:.3f}s teacher={teacher_time:.3f}s "
                  f"student={student_time:.3f}s optimizer={optimizer_time:.3f}s sum={parts:.3f}s")
            print(f"student={student_flops / 1e9:.2f} GFLOP/s matmul={matmul / 1e9:.2f} GFLOP/s")
            print(f"step_over_parts={step_time / parts:.3f} student_flops_vs_matmul={student_flops / matmul:.3f}")


if __name__ == "__main__":
    main()
