"""Entry point: ``torchrun --nproc-per-node N -m opdlm_megatron.train --config FILE.yaml [key=value ...]``.

The YAML (see ``configs/``) sets the objective, the model checkpoints, TP/PP sizes (data parallel
is the rest of the world size), data, rollout, loss, optimizer and checkpointing; ``key=value``
overrides use dotted paths (``optim.lr=1e-4 parallel.tensor_model_parallel_size=2``). A run resumes
from the newest checkpoint in its checkpoint directory unless ``checkpoint.resume=false``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .platform import initialize_runtime
from .train_config import load_train_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="opdlm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import refuse_bad_input

    args = parse_args(argv)
    return refuse_bad_input("opdlm-train", lambda: _train(args))


def _train(args) -> int:
    cfg = load_train_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .trainer import Trainer

    with initialize_runtime(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                            device=cfg.parallel.device, seed=cfg.seed) as runtime:
        trainer = Trainer(cfg, runtime)
        try:
            trainer.fit()
        finally:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
