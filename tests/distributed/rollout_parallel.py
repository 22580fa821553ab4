"""torchrun script: loads a TP=1 checkpoint at the given TP/PP (optionally with sequence parallelism), decodes the shared prompts with the
rollout engine (greedy and seeded sampling) and writes the results; all ranks must agree."""

import argparse

import torch
import torch.distributed as dist

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.rollout import DiffusionRolloutEngine
from tests.test_rollout_parallel import CASES, FORWARD_IMPLS, PROMPTS, decode_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--impls", default=",".join(FORWARD_IMPLS), help="decoding forwards to run")
    parser.add_argument("--cases", default=",".join(CASES), help="decoding cases to run")
    args = parser.parse_args()
    cases = {name: CASES[name] for name in args.cases.split(",")}

    with initialize_runtime(args.tp, args.pp, device="cpu"):
        model, config = build_from_checkpoint(args.ckpt, "student", sequence_parallel=args.sequence_parallel)
        results = {}
        for (name, (shift, kwargs)), impl in ((case, impl) for case in cases.items()
                                                  for impl in args.impls.split(",")):
            engine = DiffusionRolloutEngine(model, config.replace(logit_shift=shift), forward_impl=impl)
            result = engine.generate(PROMPTS, decode_config(**kwargs))
            key = f"{name}/{impl}"
            results[key] = {k: getattr(result, k) for k in ("answer_ids", "answer_valid", "commit_step", "finished")}
            results[key]["num_forward_passes"] = result.num_forward_passes
            # the engine decodes outside sequence parallelism and gives the model back as it was
            assert model.config.sequence_parallel == args.sequence_parallel
            if model.post_process:  # the last pipeline stage holds the output layer
                assert model.output_layer.sequence_parallel == args.sequence_parallel
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, results)
        for rank, other in enumerate(everyone):
            for name in results:
                for key, value in results[name].items():
                    same = torch.equal(value, other[name][key]) if torch.is_tensor(value) else value == other[name][key]
                    assert same, f"rank {rank} disagrees with rank {dist.get_rank()} on {name}.{key}"
        if dist.get_rank() == 0:
            torch.save(results, args.out)


if __name__ == "__main__":
    main()
