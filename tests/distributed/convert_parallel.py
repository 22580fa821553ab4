"""torchrun script: converts every tiny HF model under --models-dir at --tp/--pp and writes the
Megatron logits of the shared batch (from the last stage) to --out.

The first model goes through the CLI ``main()``, which starts (and closes) its own megatron runtime
as ``torchrun tools/convert_hf_to_megatron.py`` does; the process group is created here first
because torch.distributed cannot be re-initialised within one torchrun worker. The others go
through ``convert()`` under this script's runtime. Every checkpoint is then loaded back at the
same TP/PP and run through megatron's pipeline schedule.
"""

import argparse
import os

import torch
import torch.distributed as dist

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.commands import convert_hf_to_megatron as hf_to_megatron_cli
from opdlm_megatron.tools import convert_hf_to_megatron
from tests.distributed.convert_common import megatron_logits, model_dirs, sample_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dirs = model_dirs(args.models_dir)
    names = list(dirs)
    ckpts = {name: os.path.join(args.ckpt_dir, name) for name in names}
    dist.init_process_group("gloo")
    hf_to_megatron_cli.main([
        f"--hf-dir={dirs[names[0]]}", f"--out={ckpts[names[0]]}", f"--tp={args.tp}", f"--pp={args.pp}",
    ])
    results = {}
    with initialize_runtime(args.tp, args.pp, device="cpu"):
        from megatron.core import parallel_state

        for name in names[1:]:
            convert_hf_to_megatron.convert(dirs[name], ckpts[name], tp=args.tp, pp=args.pp)
        batch = sample_batch()
        for name in names:
            model, config = build_from_checkpoint(ckpts[name], "teacher")
            results[name] = megatron_logits(model, config, batch)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
