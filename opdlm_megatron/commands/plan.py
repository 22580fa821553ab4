"""``opdlm-plan``: check a training config and parallel layout, and estimate memory per GPU, without a GPU.

    opdlm-plan --config configs/smollm2_opd.yaml --world-size 8 --gpu-memory-gb 80 [key=value ...]

See ``plan.py`` for what is checked and counted. Exit code 0: it fits; 1: it does not (with
suggestions); 2: bad input.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from ..runtime.console import setup_console
from .base import argument_parser, refuse_bad_input

PROGRAM = "opdlm-plan"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argument_parser(PROGRAM, __doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("--world-size", type=int, required=True, help="GPUs of the run")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU (H100: 80)")
    parser.add_argument("--model-config", default=None,
                        help="architecture (opdlm_model_config.json or its directory) when the config's "
                             "checkpoint is not on this machine")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)

    setup_console(PROGRAM, verbose=args.verbose)

    def run() -> int:
        from ..config.model import ModelConfig
        from ..planning.plan import GIB, format_plan, load_architecture, plan, suggestions
        from ..training.config_files import load_train_config

        if args.world_size < 1:
            raise ValueError(f"--world-size must be a positive integer (the number of GPUs), got {args.world_size}")
        if not args.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb:g}")
        # --model-config stands in for the checkpoint (the planner reads no weights)
        extra = [f"model.student_checkpoint={args.model_config}"] if args.model_config else []
        cfg = load_train_config(args.config, extra + list(args.overrides))
        source = args.model_config or cfg.model.student_checkpoint
        note = None
        if cfg.model.random_init:
            config = ModelConfig.from_dict(dict(cfg.model.model_config))
        else:
            fp8 = bool(cfg.model.student_precision.fp8 or cfg.model.teacher_precision.fp8)
            config, note = load_architecture(source, needs_transformer_engine=fp8)
        config = cfg.student_architecture(config)  # what the trainer builds
        teacher = load_architecture(cfg.model.teacher_checkpoint)[0] if cfg.model.teacher_checkpoint else None
        result = plan(cfg, config, args.world_size, teacher)
        if note:
            result.notes.insert(0, note)
        budget = args.gpu_memory_gb * GIB
        fits = result.total <= budget
        if args.json:
            print(json.dumps({"world_size": result.world_size, "tp": result.tensor_parallel,
                              "pp": result.pipeline_parallel, "dp": result.data_parallel,
                              "parts_bytes": result.parts, "total_bytes": result.total, "fits": fits,
                              "notes": result.notes}, indent=2))
        else:
            print(format_plan(result, budget))
            if fits:
                print("fits")
            else:
                print(f"does NOT fit: {result.total / GIB:.1f} GiB > {args.gpu_memory_gb:g} GiB; try:")
                for tip in suggestions(result, cfg, config, budget):
                    print(f"  - {tip}")
        return 0 if fits else 1

    return refuse_bad_input(PROGRAM, run)



if __name__ == "__main__":
    sys.exit(main())
