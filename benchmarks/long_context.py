"""Long OPD rows under context parallelism: what a student rank keeps for backward, and its step time,
at CP=2 against CP=1 (``parallel.context_parallel_size``; model/context_parallel.py).

    python benchmarks/long_context.py            # one OPD row of 8,192 columns (a 3,968-token answer)
    python benchmarks/long_context.py --quick    # 1,024 columns (CI)

Runs itself under torchrun with 2 ranks (CPU, gloo). The student is a small random model (2 layers,
hidden 256, 4 heads, fp32, local spec, dense attention: its fp32 softmax probabilities of the
arbitrary ``[prompt | x0 | xt]`` mask are the part that grows with the square of the row). For each CP
size the same micro-batch (one row, ``block`` states, full-vocabulary teacher targets) goes through
the student step's own forward (``StudentStepPlan.forward_microbatch``: at CP=2 each rank its zigzag
half of the columns, keys and values gathered):

* activation bytes: what autograd keeps for backward on a rank (``saved_activation_bytes``, the
  measurement the planner's count is tested against), and the planner's count beside it;
* step time: forward + backward of the micro-batch, the median of ``--repeats``. At CP=1 both ranks
  run the whole row (as two data-parallel ranks would, each its own row), at CP=2 they share one.

The last line reads ``columns=N cp2_over_cp1_activation_bytes=R step_time_ratio=T estimate_ratio=E``
(goal: R <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _measure(columns: int, repeats: int) -> dict:
    import torch
    from megatron.core import parallel_state

    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.distill.states import select_states
    from opdlm_megatron.distill.teacher import TeacherTargets
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.model.losses import DivergenceConfig
    from opdlm_megatron.objectives.base import SupervisedBatch
    from opdlm_megatron.planning.activations import ActivationShape, activation_bytes, saved_activation_bytes
    from opdlm_megatron.rollout.types import RolloutResult
    from opdlm_megatron.training.student import StudentStepPlan

    prompt = 256 if columns >= 2048 else 64
    answer = (columns - prompt) // 2
    config = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                         num_query_groups=2, vocab_size=1000, max_sequence_length=columns, block_size=4)
    torch.manual_seed(0)  # the same weights and row on every rank and at every CP size
    model = build_model(config, "student")
    g = torch.Generator().manual_seed(1)
    rollout = RolloutResult(
        prompt_ids=torch.randint(3, 900, (1, prompt), generator=g), prompt_valid=torch.ones(1, prompt, dtype=torch.bool),
        answer_ids=torch.randint(3, 900, (1, answer), generator=g), answer_valid=torch.ones(1, answer, dtype=torch.bool),
        commit_step=torch.arange(answer)[None] // 2, num_rounds=torch.tensor([(answer + 1) // 2]),
        finished=torch.ones(1, dtype=torch.bool), num_forward_passes=(answer + 1) // 2)
    xt = select_states(rollout, "block", torch.Generator().manual_seed(2), config.mask_token_id, block_size=4)
    supervised = (xt == config.mask_token_id) & rollout.answer_valid
    batch = SupervisedBatch(rollout, supervised, supervised, distill=True, layout="opd", xt=xt)
    logits = torch.randn(1, answer, config.padded_vocab_size(1), generator=torch.Generator().manual_seed(3))
    plan = StudentStepPlan(model, config, batch, TeacherTargets.dense(logits, (1, answer)), DivergenceConfig(), 1)
    mb = plan.microbatches[0]

    def forward_and_loss():
        output, loss_func = plan.forward_microbatch(mb, model)
        return loss_func(output)[0]

    kept = saved_activation_bytes(model, forward_and_loss)
    cp = parallel_state.get_context_parallel_world_size()
    shape = ActivationShape(plan.seq_length, 1, int(mb["slot_valid"].sum()), 1, None, True, False, cp)
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        forward_and_loss().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return dict(columns=plan.seq_length, kept=kept, estimate=activation_bytes(config, shape), seconds=statistics.median(times))


def worker(args) -> None:
    import torch

    from opdlm_megatron.runtime.platform import initialize_runtime

    torch.distributed.init_process_group(backend="gloo")
    out = {}
    for cp in (1, 2):
        with initialize_runtime(1, 1, cp, device="cpu", seed=0):
            out[cp] = _measure(args.columns, args.repeats)
    parts = [None, None]
    torch.distributed.all_gather_object(parts, out)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(parts, f)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,024 columns, 2 repeats (CI)")
    parser.add_argument("--columns", type=int, default=8192, help="OPD row length (prompt + 2 x answer)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.columns, args.repeats = 1024, 2
    if args.columns < 256 or args.columns % 8:
        parser.error(f"--columns {args.columns}: need a multiple of 8, at least 256")
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "parts.json")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             env.get("PYTHONPATH", "")])
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={port}", os.path.abspath(__file__), "--worker", f"--columns={args.columns}",
                        f"--repeats={args.repeats}", f"--out={out}"], env=env, check=True)
        with open(out) as f:
            parts = json.load(f)
    for rank, part in enumerate(parts):
        for cp in ("1", "2"):
            r = part[cp]
            print(f"rank {rank} CP={cp}: {r['columns']} columns, kept for backward {r['kept'] / 2**20:8.1f} MiB "
                  f"(count {r['estimate'] / 2**20:8.1f} MiB), forward+backward {r['seconds']:.3f} s")
    worst = {cp: max(part[cp]["kept"] for part in parts) for cp in ("1", "2")}
    estimate = {cp: max(part[cp]["estimate"] for part in parts) for cp in ("1", "2")}
    seconds = {cp: max(part[cp]["seconds"] for part in parts) for cp in ("1", "2")}
    print(f"columns={parts[0]['1']['columns']} cp2_over_cp1_activation_bytes={worst['2'] / worst['1']:.3f} "
          f"step_time_ratio={seconds['2'] / seconds['1']:.3f} estimate_ratio={estimate['2'] / estimate['1']:.3f}")


if __name__ == "__main__":
    main()
