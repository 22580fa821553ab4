"""torchrun script (2 ranks): for each layout of --layouts (ep2: two expert-parallel ranks, pp2: two pipeline
stages), converts every tiny HF mixture-of-experts model named in --names at that layout, loads it back, and
loads the --reference-dir checkpoint (converted at one rank) at the same layout; rank 0 of the last stage writes
{layout: {name: {"converted": logits, "reloaded": logits}}} to --out."""

import argparse
import os

import torch
import torch.distributed as dist

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.tools.convert_hf_to_megatron import convert
from tests.distributed.convert_common import megatron_logits, sample_batch

LAYOUTS = {"ep2": dict(pp=1, ep=2), "pp2": dict(pp=2, ep=1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--names", required=True)
    parser.add_argument("--reference-dir", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--layouts", default="ep2,pp2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    batch = sample_batch()
    out = {}
    for layout in args.layouts.split(","):
        sizes = LAYOUTS[layout]
        results = {}
        with initialize_runtime(1, sizes["pp"], device="cpu", expert_model_parallel_size=sizes["ep"]):
            from megatron.core import parallel_state

            for name in args.names.split(","):
                ckpt = os.path.join(args.ckpt_dir, layout, name)
                convert(os.path.join(args.models_dir, name), ckpt, pp=sizes["pp"], ep=sizes["ep"])
                converted = megatron_logits(*build_from_checkpoint(ckpt, "teacher"), batch)
                reloaded = megatron_logits(*build_from_checkpoint(os.path.join(args.reference_dir, name), "teacher"),
                                           batch)
                results[name] = dict(converted=converted, reloaded=reloaded)
            keep = parallel_state.is_pipeline_last_stage() and parallel_state.get_data_parallel_rank() == 0
        if keep:
            out[layout] = results
    # the last stage's first data-parallel rank holds every layout's logits only if it is one rank for all layouts
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        merged = {}
        for part in gathered:
            merged.update(part)
        torch.save(merged, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
