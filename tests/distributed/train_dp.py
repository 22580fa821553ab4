"""torchrun script (2 ranks, data parallel 2): the same training run as the in-process DP=1 run of
tests/test_trainer.py::test_dp2_training_matches_dp1 (engine rollouts sampled at temperature 1), once
straight through with the distributed optimizer and once stopped inside a rollout and resumed
(without it: megatron-core 0.19 does not restore its state exactly without Apex/TE); then at context
parallel 2 (both ranks decode the same rollouts, each trains on half of every row's columns, the
distributed optimizer shards over the CP pair); rank 0 writes the histories to --out."""

import argparse
import json

import torch

from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
from opdlm_megatron.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="JSON training config (the DP=1 run's)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.config) as f:
        base = json.load(f)
    torch.distributed.init_process_group(backend="gloo")
    out = {}
    for name, until, distopt, cp in (("straight", None, "on", 1), ("resumed", 1, "off", 1), ("cp2", None, "on", 2)):
        data = {**base, "run_dir": f"{args.run_dir}/{name}",
                "parallel": {**base.get("parallel", {}), "distributed_optimizer": distopt, "context_parallel_size": cp}}
        histories = []
        for stop in ([until, None] if until else [None]):
            cfg = train_config_from_dict(data)
            with initialize_runtime(1, 1, cp, device="cpu", seed=cfg.seed) as rt:
                trainer = Trainer(cfg, rt)
                assert trainer.distributed_optimizer == (distopt == "on") and rt.data_parallel_size == 2 // cp
                histories += trainer.fit(stop)
                trainer.close()
        out[name] = histories
    if torch.distributed.get_rank() == 0:
        torch.save(out, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
