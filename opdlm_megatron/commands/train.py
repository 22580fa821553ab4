"""``opdlm-train --config FILE.yaml [key=value ...]`` (under torchrun: ``-m opdlm_megatron.train``).

The YAML (see ``configs/``) sets the objective, the model checkpoints, TP/PP sizes (data parallel
is the rest of the world size), data, rollout, loss, optimizer and checkpointing; ``key=value``
overrides use dotted paths (``optim.lr=1e-4 parallel.tensor_model_parallel_size=2``). A run resumes
from the newest checkpoint in its checkpoint directory unless ``checkpoint.resume=false``. The screen
shows the run's own lines and its progress bar; everything else is logged to ``<run_dir>/logs/``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..runtime.console import setup_console
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-train"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argument_parser(PROGRAM, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_console(PROGRAM, verbose=args.verbose)
    return refuse_bad_input(PROGRAM, lambda: run(args))


def run(args) -> int:
    from ..runtime.platform import initialize_runtime
    from ..training.config_files import load_train_config
    from ..training.schedules import decay_steps
    from ..training.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    if cfg.train.steps is not None:  # a schedule that cannot be built is refused before any work
        decay_steps(cfg.optim, cfg.train.steps)
    with initialize_runtime(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                            cfg.parallel.context_parallel_size, device=cfg.parallel.device, seed=cfg.seed,
                            expert_model_parallel_size=cfg.parallel.expert_model_parallel_size) as runtime:
        trainer = Trainer(cfg, runtime)
        try:
            trainer.fit()
        finally:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
