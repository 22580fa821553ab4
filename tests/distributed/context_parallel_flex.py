"""torchrun script (2 ranks): the student step's loss, forward only, on the same OPD batch with
FlexAttention and with dense attention, at CP=2 (each rank its columns; FlexAttention's BlockMask of
this rank's query rows against every key) and at CP=1 (two data-parallel ranks with the same rows).
FlexAttention has no backward on CPU, so this is the forward of the CP path on CPU; rank 0 writes
{"<backend>/cp<size>": loss} to --out."""

import argparse
import json

import torch

from opdlm_megatron.model.build import build_model
from opdlm_megatron.model.losses import DivergenceConfig
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.distributed.student_data import synthetic_rollout
from tests.helpers import student_forward_backward, tiny_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group(backend="gloo")
    out = {}
    for cp in (1, 2):
        for backend in ("dense", "flex"):
            with initialize_runtime(1, 1, cp, device="cpu", seed=4):
                config = tiny_config().replace(attention_backend=backend)
                torch.manual_seed(0)
                model = build_model(config, "student")
                result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, prompt_len=9,
                                           answer_len=23, seed=6)
                xt = torch.where(torch.rand(result.answer_ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                                 torch.full_like(result.answer_ids, config.mask_token_id), result.answer_ids)
                logits = torch.randn(3, result.answer_ids.shape[1], config.padded_vocab_size(1),
                                     generator=torch.Generator().manual_seed(2))
                with torch.no_grad():  # FlexAttention on CPU refuses inputs that need gradients
                    step = student_forward_backward(model, config, result, xt, logits, "distill", DivergenceConfig(),
                                                    3, forward_only=True)
                out[f"{backend}/cp{cp}"] = step["loss"]
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
