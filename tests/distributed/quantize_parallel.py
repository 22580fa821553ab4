"""torchrun script: loads a TP=1 checkpoint at --tp / --pp, quantizes it (ModelOpt, --format) calibrated on
decoding the shared prompts, and writes (last rank) the quantizers' ranges of every layer, the logits of one
prompt (PP 1: gathered over the tensor-parallel ranks) and the quantized student's decoding."""

import argparse

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.rollout import DiffusionRolloutEngine
from opdlm_megatron.rollout.calibration import quantize_on_rollouts
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.test_quantization import DECODE, PROMPTS, quantized_ranges


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--format", default="fp8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with initialize_runtime(args.tp, args.pp, device="cpu", seed=0):
        model, config = build_from_checkpoint(args.ckpt, "student")
        model.eval()
        quantize_on_rollouts(model, config, args.format, PROMPTS, DECODE)
        ranges = [None] * dist.get_world_size()
        dist.all_gather_object(ranges, quantized_ranges(model))
        result = DiffusionRolloutEngine(model, config).generate(PROMPTS, DECODE)
        logits = None
        if args.pp == 1:  # one forward of the whole model (the engine runs the pipeline stages itself)
            ids = torch.tensor([PROMPTS[2]])
            with torch.no_grad():
                logits = gather_from_tensor_model_parallel_region(model(ids, torch.arange(ids.shape[1])[None], None))
        if dist.get_rank() == dist.get_world_size() - 1:
            merged = {name: value for rank in ranges for name, value in rank.items()}
            torch.save({"ranges": merged, "logits": logits, "answer_ids": result.answer_ids,
                        "commit_step": result.commit_step}, args.out)


if __name__ == "__main__":
    main()
