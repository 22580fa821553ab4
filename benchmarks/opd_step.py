"""One OPD training step vs the sum of its parts, the student's FLOP/s, and what computing only the
columns the loss reads saves.

    python benchmarks/opd_step.py [--layers 4 --hidden 256 --vocab 49152 --prompts 4 --rollout-len 32]
    torchrun --nproc-per-node 2 benchmarks/opd_step.py --tp 2

Builds a randomly initialised student/teacher pair and runs the trainer (one rollout per step here:
``tasks_per_rollout = global_batch_size = --prompts``). It times

* whole training steps (``Trainer.train_step``) against each phase alone on the same inputs: rollout
  (block-diffusion engine), states, teacher targets, student forward/backward, optimizer step
  (goal ``step_over_parts <= 1.10``: the loop adds little beyond its parts);
* the student's fwd/bwd FLOP/s (6 x parameters x tokens of ``[prompt | x0 | xt]`` plus attention)
  against a dense fp32 matmul timed in the same run;
* the student step and the teacher targets as they are (output layer only on the columns the loss
  reads; teacher logits kept only for supervised positions) against the same computation with the
  output layer on every column and the teacher's logits kept for every answer position, as before:
  time saved and the bytes of logits held.

The last line reads ``step_over_parts=X student_flops_vs_matmul=Y loss_columns_time_saved=Z
logits_bytes_ratio=W`` (Z: 1 - time(now) / time(every column) of student step + teacher targets;
W: bytes of student + teacher logits now / before).

``--moe`` times instead whole OPD steps of a mixture-of-experts student (``--experts`` experts of width
``--expert-ffn``, top ``--topk``; default 8 experts of 2 x hidden, top 2) against a dense student with
the same active parameters (FFN width top-k x expert width), the same prompts and rollout lengths; under
``torchrun --nproc-per-node 2`` also the MoE student at expert parallel size 2 (each rank holds half the
experts; tokens travel by all-to-all) against EP 1 (both data-parallel over the two ranks). Last line:
``moe_over_dense=X ep2_over_ep1=Y`` (step time ratios; Y is n/a on one process).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.model import build as model_module  # noqa: E402
from opdlm_megatron.training import student as student_module  # noqa: E402
from opdlm_megatron.data.samples import Sample  # noqa: E402
from opdlm_megatron.runtime.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.distill.teacher import TeacherTargets  # noqa: E402
from opdlm_megatron.training.config_files import train_config_from_dict  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--rollout-len", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--moe", action="store_true", help="MoE vs dense (and EP 2 vs EP 1 under torchrun)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=None, help="each expert's FFN width (default 2 x hidden)")
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


class LogitsMeter:
    """Wraps ``logits_at_columns``: counts the bytes of logits the model returns; with
    ``every_column`` it runs the output layer on every column and then picks the asked ones (the
    computation before the output layer was restricted)."""

    def __init__(self, every_column: bool) -> None:
        self.every_column = every_column
        self.bytes = 0
        self.original = model_module.logits_at_columns

    def __call__(self, model, input_ids, position_ids, mask, columns):
        if not self.every_column:
            out = self.original(model, input_ids, position_ids, mask, columns)
        else:
            out = model(input_ids, position_ids, mask)
            if out.dim() == 3 and out.shape[0] == input_ids.shape[0]:  # logits (last stage)
                self.bytes = max(self.bytes, out.numel() * out.element_size())
                chunks = columns if isinstance(columns, model_module.ColumnChunks) else None
                index = (chunks.columns if chunks else columns).to(out.device)
                out = out.gather(1, index[..., None].expand(-1, -1, out.shape[-1]))
                if chunks is not None:  # the teacher's consumer: all at once
                    chunks.consume(0, out)
                    return out.new_zeros(())
        if out.dim() == 3 and out.shape[0] == input_ids.shape[0] and not self.every_column:
            self.bytes = max(self.bytes, out.numel() * out.element_size())
        return out


@contextmanager
def output_columns(every_column: bool):
    meter = LogitsMeter(every_column)
    saved = (model_module.logits_at_columns, student_module.logits_at_columns)
    model_module.logits_at_columns = student_module.logits_at_columns = meter
    try:
        yield meter
    finally:
        model_module.logits_at_columns, student_module.logits_at_columns = saved


def dense_model_config(args) -> dict:
    return dict(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        num_attention_heads=args.heads, num_query_groups=max(1, args.heads // 2), vocab_size=args.vocab,
        max_sequence_length=max(256, 2 * (args.prompt_len + args.rollout_len)), eos_token_ids=[2], block_size=4,
    )


def step_config(args, model_config: dict, run_dir: str, dp: int = 1, ep: int = 1):
    return train_config_from_dict(dict(
        objective="opd", run_dir=run_dir, seed=0,
        train=dict(steps=100, global_batch_size=args.prompts, micro_batch_size=args.micro_batch_size),
        model=dict(random_init=True, model_config=model_config),
        parallel=dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, device=args.device,
                      expert_model_parallel_size=ep),
        data=dict(source="token_ids", path="unused"),
        # threshold 1.0 with a random model: the rollout always runs the full length (stable timings)
        rollout=dict(tasks_per_rollout=args.prompts, threshold=1.0, temperature=1.0),
        curriculum=dict(min_length=args.rollout_len, max_length=args.rollout_len, warmup_rollouts=1),
        checkpoint=dict(resume=False), logging=dict(progress_bar=False),
    ))


def moe_main(args, samples) -> None:
    """Step times: dense vs MoE of the same active parameters; under torchrun (2 ranks) MoE at EP 2 vs EP 1."""
    import torch.distributed as dist

    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.training.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if args.device == "cpu" or not torch.cuda.is_available() else "nccl")
    expert_ffn = args.expert_ffn or 2 * args.hidden
    dense = dense_model_config(args)
    dense["ffn_hidden_size"] = args.topk * expert_ffn  # the MoE student's active FFN width
    moe = dict(dense, num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=expert_ffn)
    runs = [("dense", dense, 1), ("moe_ep1", moe, 1)] + ([("moe_ep2", moe, 2)] if world == 2 else [])
    times, rank = {}, 0
    for name, model_config, ep in runs:
        cfg = step_config(args, model_config, tempfile.mkdtemp(prefix=f"opd_step_{name}_"), ep=ep)
        with initialize_runtime(args.tp, args.pp, device=args.device, seed=0, expert_model_parallel_size=ep) as rt:
            trainer = Trainer(cfg, rt, samples=samples)
            for _ in range(2):  # warm-up
                trainer.train_step()
            times[name], metrics = timed(trainer.train_step, args.repeats)
            trainer.close()
            rank = rt.rank
        if rank == 0:
            config = ModelConfig(**model_config)
            share = (f" busiest expert {metrics['moe/expert_share_max']:.3f} idlest {metrics['moe/expert_share_min']:.3f}"
                     if "moe/expert_share_max" in metrics else "")
            print(f"{name}: parameters {config.num_parameters() / 1e6:.2f}M (active "
                  f"{config.num_parameters(active=True) / 1e6:.2f}M) EP {ep} step {times[name]:.3f}s{share}")
    if rank == 0:
        ep2 = f"{times['moe_ep2'] / times['moe_ep1']:.3f}" if "moe_ep2" in times else "n/a"
        print(f"moe_over_dense={times['moe_ep1'] / times['dense']:.3f} ep2_over_ep1={ep2}")


def main() -> None:
    args = parse_args()
    from opdlm_megatron.training.trainer import Trainer

    model_config = dense_model_config(args)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist())
               for _ in range(8 * args.prompts)]
    if args.moe:
        return moe_main(args, samples)
    cfg = step_config(args, model_config, tempfile.mkdtemp(prefix="opd_step_"))
    with initialize_runtime(args.tp, args.pp, device=args.device, seed=0) as rt:
        trainer = Trainer(cfg, rt, samples=samples)
        for _ in range(2):  # warm-up
            trainer.train_step()
        step_time, _ = timed(trainer.train_step, args.repeats)

        rollout_time, buffer = timed(trainer.data._next_rollout, args.repeats)
        trainer.data.buffer = buffer
        states_time, batch = timed(lambda: trainer.data._supervised_batch(buffer, trainer.step), args.repeats)
        teacher_time, (targets, _) = timed(lambda: trainer.data._teacher_targets(batch), args.repeats)
        r = batch.answers

        def student_step():
            trainer.model.zero_grad_buffer()
            return student_module.student_step(trainer.model, trainer.config, batch, targets, trainer.divergence,
                                               cfg.train.micro_batch_size)

        student_time, _ = timed(student_step, args.repeats)
        optimizer_time, _ = timed(lambda: trainer.optimizer.step(), args.repeats)
        parts = rollout_time + states_time + teacher_time + student_time + optimizer_time

        # only the columns the loss reads vs every column (and every answer position kept by the teacher)
        with output_columns(every_column=False) as now:
            now_student, _ = timed(student_step, args.repeats)
        with output_columns(every_column=True) as before:
            before_student, _ = timed(student_step, args.repeats)

            def dense_teacher():
                logits = trainer.teacher.answer_logits(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid,
                                                       cfg.train.micro_batch_size)
                return TeacherTargets.dense(logits, tuple(r.answer_ids.shape))

            before_teacher, dense = timed(dense_teacher, args.repeats)
        now_bytes = now.bytes + targets.nbytes
        before_bytes = before.bytes + dense.nbytes
        saved = 1.0 - (now_student + teacher_time) / (before_student + before_teacher)

        params = sum(p.numel() for p in trainer.student.parameters())
        seq = r.prompt_ids.shape[1] + 2 * r.answer_ids.shape[1]
        tokens = r.batch_size * seq
        # dense attention scores + values: 2 matmuls of [S, S, d] per layer, x3 for fwd+bwd
        attention = 3 * 2 * 2 * r.batch_size * seq * seq * args.hidden * args.layers
        student_flops = (6 * params * tokens + attention) / student_time
        matmul = matmul_flops(1024, rt.device)
        trainer.close()

        if rt.rank == 0:
            print(f"device={rt.device} params={params} vocab={args.vocab} rows={r.batch_size} "
                  f"prompt={r.prompt_ids.shape[1]} answer={r.answer_ids.shape[1]} "
                  f"supervised={int(batch.supervised.sum())} forwards={buffer.answers.num_forward_passes}")
            print(f"step={step_time:.3f}s parts: rollout={rollout_time:.3f}s states={states_time:.4f}s "
                  f"teacher={teacher_time:.3f}s student={student_time:.3f}s optimizer={optimizer_time:.3f}s "
                  f"sum={parts:.3f}s")
            print(f"student={student_flops / 1e9:.2f} GFLOP/s matmul={matmul / 1e9:.2f} GFLOP/s")
            print(f"loss columns only: student {now_student:.3f}s (every column {before_student:.3f}s), teacher "
                  f"{teacher_time:.3f}s (every answer position {before_teacher:.3f}s); logits held "
                  f"{now_bytes / 2**20:.2f} MiB (before {before_bytes / 2**20:.2f} MiB: student "
                  f"{before.bytes / 2**20:.2f}, teacher {dense.nbytes / 2**20:.2f})")
            print(f"step_over_parts={step_time / parts:.3f} student_flops_vs_matmul={student_flops / matmul:.3f} "
                  f"loss_columns_time_saved={saved:.3f} logits_bytes_ratio={now_bytes / before_bytes:.3f}")


if __name__ == "__main__":
    main()
