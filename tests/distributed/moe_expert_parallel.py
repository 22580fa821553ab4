"""torchrun script (2 ranks, expert parallel size 2: each rank holds half of the experts of the --ckpt MoE
model): the ranks do work of different lengths, which an MoE forward at EP 2 (a collective: tokens travel to
their experts by all-to-all) only survives if the shorter rank forwards idle rows meanwhile:

* rollouts: rank 0 decodes one prompt for --short new tokens, rank 1 the other prompts for --long;
* teacher scoring (forward-only micro-batches): rank 0 scores 1 answer, rank 1 three, one per micro-batch;
* a student step (forward and backward micro-batches, cross entropy on masked answer tokens): the same split.

Writes {"rollouts": {rank: result tensors}, "nll": {rank: [B, A]}, "loss": the step's global loss,
"local_experts": experts per rank} to --out (rank 0)."""

import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.distill.teacher import FrozenTeacher
from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.helpers import student_forward_backward
from tests.test_rollout import PROMPTS


def shares(rank: int):
    """(prompts, max_new_tokens) of each rank."""
    return (PROMPTS[:1], 8) if rank == 0 else (PROMPTS[1:], 16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--xt", required=True, help="torch file: {rank: xt of that rank's rollout rows}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    with initialize_runtime(1, 1, device="cpu", seed=0, expert_model_parallel_size=2) as rt:
        rank = rt.rank
        model, config = build_from_checkpoint(args.ckpt, "student")
        local_experts = len(model.decoder.layers[0].mlp.experts.local_experts)
        prompts, max_new = shares(rank)
        decode = DecodeConfig(max_new_tokens=max_new, block_size=4, threshold=0.5, eos_token_ids=[])
        result = DiffusionRolloutEngine(model.eval(), config).generate(prompts, decode)

        teacher = FrozenTeacher(model, config, config)
        nll = teacher.answer_nll(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid,
                                 micro_batch_size=1)

        xt = torch.load(args.xt)[rank]
        model.train()
        step = student_forward_backward(model, config, result, xt, result.answer_ids, "ce", None, micro_batch_size=1,
                                        normalization="token")
        assert parallel_state.get_expert_model_parallel_world_size() == 2
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, dict(rollout=result.tensors(), nll=nll, local_experts=local_experts))
    if rank == 0:
        torch.save(dict(rollouts={r: p["rollout"] for r, p in enumerate(parts)},
                        nll={r: p["nll"] for r, p in enumerate(parts)},
                        local_experts=[p["local_experts"] for p in parts], loss=step["loss"]), args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
