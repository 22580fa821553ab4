"""torchrun script (2 or 4 ranks): trains each objective of --objectives at the layouts of --layouts (TP=2, TP=2
with sequence parallelism, PP=2, CP=2, EP=2 for mixtures of experts, and combinations) on replayed TP=1 rollouts; rank 0 writes each (objective, layout)'s per-step
metrics to --out."""

import argparse

import torch
from megatron.core.utils import unwrap_model

from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
from opdlm_megatron.training.trainer import Trainer
from tests.distributed.train_common import ReplayRollout, tiny_train_dict


# (name, TP, PP, sequence parallelism, CP, EP)
LAYOUTS = (("tp2", 2, 1, False, 1, 1), ("tp2sp", 2, 1, True, 1, 1), ("pp2", 1, 2, False, 1, 1),
           ("tp2pp2sp", 2, 2, True, 1, 1), ("cp2", 1, 1, False, 2, 1), ("tp2spcp2", 2, 1, True, 2, 1),
           ("pp2cp2", 1, 2, False, 2, 1), ("ep2", 1, 1, False, 1, 2), ("pp2ep2", 1, 2, False, 1, 2),
           ("cp2ep2", 1, 1, False, 2, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rollouts", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--objectives", default="opd")
    parser.add_argument("--override", action="append", default=[], help="key=value config overrides")
    parser.add_argument("--layouts", default="tp2,pp2", help=f"some of {[layout[0] for layout in LAYOUTS]}")
    args = parser.parse_args()
    recorded = torch.load(args.rollouts, weights_only=False)
    # one process group for both layouts (initialize_runtime then leaves it alone on close)
    torch.distributed.init_process_group(backend="gloo")
    out = {}
    for objective in args.objectives.split(","):
        results = recorded.get(objective, recorded.get("results"))
        for name, tp, pp, sp, cp, ep in [layout for layout in LAYOUTS if layout[0] in args.layouts.split(",")]:
            cfg = train_config_from_dict(tiny_train_dict(
                f"{args.run_dir}/{objective}_{name}", args.data, args.ckpt, objective=objective, train=dict(steps=2),
                parallel=dict(device="cpu", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sp, context_parallel_size=cp, expert_model_parallel_size=ep),
                checkpoint=dict(resume=False)), args.override)
            with initialize_runtime(tp, pp, cp, device="cpu", seed=cfg.seed, expert_model_parallel_size=ep) as rt:
                trainer = Trainer(cfg, rt, rollout_fn=ReplayRollout(results))
                # what the student's training forwards attended: (query columns, key columns) of layer 1
                shapes = set()
                first_stage_layer = unwrap_model(trainer.student).decoder.layers[0].self_attention.core_attention
                hook = first_stage_layer.register_forward_pre_hook(
                    lambda module, args: shapes.add((args[0].shape[0], args[3].shape[-1]))
                    if torch.is_grad_enabled() and args[3] is not None else None)
                history = trainer.fit()
                hook.remove()
                out[f"attended/{objective}/{name}"] = sorted(shapes)
                models = [unwrap_model(trainer.student)] + ([trainer.teacher.model] if trainer.teacher is not None else [])
                # what ran: SP on in both models, every norm weight marked for megatron's TP reduction
                out[f"sequence_parallel/{objective}/{name}"] = [
                    (m.config.sequence_parallel,
                     all(getattr(p, "sequence_parallel", False) for n, p in m.named_parameters() if "norm" in n))
                    for m in models]
                trainer.close()
                rank = rt.rank
            out[name if objective == "opd" else f"{objective}/{name}"] = history
    if rank == 0:
        torch.save(out, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
