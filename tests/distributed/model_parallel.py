"""torchrun script: loads a TP=1 reference checkpoint at the given TP/PP and runs forward/backward
through megatron's pipeline schedule; the last stage writes loss, logits and grad norm to --out."""

import argparse

import torch

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.helpers import forward_backward, random_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--kinds", default="block,causal")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with initialize_runtime(args.tp, args.pp, device="cpu") as rt:
        model, config = build_from_checkpoint(args.ckpt, "student")
        if args.attention_backend:
            config = config.replace(attention_backend=args.attention_backend)
        batch = random_batch(config)
        results = {}
        for kind in args.kinds.split(","):
            results[kind] = forward_backward(model, config, batch, kind, num_microbatches=args.microbatches)
        from megatron.core import parallel_state

        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(results, args.out)


if __name__ == "__main__":
    main()
