"""torchrun script (2 ranks): the teacher and the student step at TP=2 and then PP=2, in one launch.

For each layout it loads the TP=1 reference checkpoints of tests/test_student_step.py, computes the
teacher's answer logits (gathered over TP for comparison), runs ``student_forward_backward`` for
the objectives of ``student_data.CASES`` and records loss and layer grad norm. With ``--losses`` it
also runs the TP=2 loss checks of losses_tp2.py. Global rank 0 (TP=2) and the last stage (PP=2)
write ``--out`` (torch.save) as {layout: {...}}.
"""

import argparse

import torch
import torch.distributed as dist

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.distill.teacher import FrozenTeacher
from tests.distributed.student_data import run_cases


def run_layout(args) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    student, config = build_from_checkpoint(args.student_ckpt, "student")
    teacher = FrozenTeacher.from_checkpoint(args.teacher_ckpt, config)
    out = run_cases(student, config, teacher)
    if parallel_state.is_pipeline_last_stage():
        out["teacher_logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(out["teacher_logits"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student-ckpt", required=True)
    parser.add_argument("--teacher-ckpt", required=True)
    parser.add_argument("--losses-out", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    results = {}
    outer = initialize_runtime(tensor_model_parallel_size=2, device="cpu", seed=11)
    try:
        if args.losses_out:
            from tests.distributed import losses_tp2

            errors = losses_tp2.run_checks()
            if dist.get_rank() == 0:
                losses_tp2.write(errors, args.losses_out)
        results["tp2"] = run_layout(args)
        keep_tp2 = dist.get_rank() == 0
        # same process group, new megatron layout (initialize_runtime re-initialises parallel_state)
        with initialize_runtime(pipeline_model_parallel_size=2, device="cpu", seed=11):
            from megatron.core import parallel_state

            results["pp2"] = run_layout(args)
            writer = parallel_state.is_pipeline_last_stage()
        mine = {k: v for k, v in results.items() if (k == "tp2" and keep_tp2) or (k == "pp2" and writer)}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if dist.get_rank() == 0:
            merged = {}
            for part in gathered:
                merged.update(part)
            torch.save(merged, args.out)
    finally:
        outer.close()


if __name__ == "__main__":
    main()
