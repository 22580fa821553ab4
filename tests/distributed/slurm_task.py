"""One SLURM-style task (started without torchrun, SLURM_* variables only): TP=2 runtime, a
tensor-parallel forward of a tiny model, and the ranks' view of the job written to --out."""

import argparse
import json
import os

import torch
import torch.distributed as dist

from opdlm_megatron.model.build import build_model
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.helpers import tiny_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ, "this task must start from SLURM's variables"
    with initialize_runtime(2, 1, device="cpu", seed=3) as rt:
        torch.manual_seed(0)
        model = build_model(tiny_config(), "student")
        ids = torch.tensor([[5, 6, 7, 8]])
        mask = ~torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
        with torch.no_grad():
            logits = model(ids, torch.arange(4)[None], mask)
        total = torch.tensor([float(logits.float().sum())])
        dist.all_reduce(total)
        view = dict(rank=rt.rank, world=rt.world_size, local_rank=int(os.environ["LOCAL_RANK"]),
                    master=os.environ["MASTER_ADDR"], logits_sum=float(total))
    with open(f"{args.out}.{view['rank']}", "w") as f:
        json.dump(view, f)


if __name__ == "__main__":
    main()
