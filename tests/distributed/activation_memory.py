"""torchrun script (2 ranks; TP=2, TP=2 with sequence parallelism, PP=2, CP=2): every rank measures the activation bytes its part of the
student keeps for backward and the planner's count for that rank (tests/test_plan.py); rank 0 writes
{layout: {"rank <r> <model> top_k=<k>": estimate / measured}} over both ranks to --out."""

import argparse
import json

import torch.distributed as dist

from opdlm_megatron.runtime.platform import initialize_runtime
from tests.test_plan import ACTIVATION_MODELS, measure_activations


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", default="tp2,pp2", help="some of tp2, tp2sp, pp2, cp2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # one process group for both layouts (initialize_runtime then leaves it alone on close)
    dist.init_process_group(backend="gloo")
    out = {}
    for layout in args.layouts.split(","):
        sizes = {"tp2": dict(tensor_model_parallel_size=2), "tp2sp": dict(tensor_model_parallel_size=2),
                 "pp2": dict(pipeline_model_parallel_size=2), "cp2": dict(context_parallel_size=2)}[layout]
        tp = sizes.get("tensor_model_parallel_size", 1)
        with initialize_runtime(device="cpu", seed=1, **sizes):
            rank = dist.get_rank()
            ratios = {}
            for name, shape in sorted(ACTIVATION_MODELS.items()):
                if shape["num_attention_heads"] % tp or shape.get("num_query_groups", shape["num_attention_heads"]) % tp:
                    continue  # SmolLM2's 9 heads / 3 groups do not split over 2 ranks
                for top_k in (None, 16):
                    measured, estimate = measure_activations(name, top_k, 32, 64, 2,
                                                             sequence_parallel=layout == "tp2sp")
                    ratios[f"rank {rank} {name} top_k={top_k}"] = estimate / measured
            gathered = [None, None]
            dist.all_gather_object(gathered, ratios)
            out[layout] = {k: v for part in gathered for k, v in part.items()}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
