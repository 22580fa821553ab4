"""torchrun script (2 ranks, TP=2): every rank builds the full logits from a fixed seed, keeps its
half of the vocabulary, runs the vocab-parallel losses on it and compares values and its gradient
shard with the dense float64 reference of tests/test_losses.py. Rank 0 writes the max errors
(over ranks) to --out as {name: [value_error, grad_error]}."""

import argparse
import json

import torch
import torch.distributed as dist

from opdlm_megatron.model.losses import DivergenceConfig, TeacherTopK, divergence, masked_diffusion_nll
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.test_losses import KINDS, VARIANTS, make_logits, reference_divergence


def shard(x, rank, tp):
    width = x.shape[-1] // tp
    return x[..., rank * width:(rank + 1) * width]


def run_checks() -> dict:
    """Max errors over ranks {name: [value_error, grad_error]}; needs a TP=2 runtime."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != 2:
        raise ValueError(f"run_checks needs tensor parallel size 2, got {tp}")
    student, teacher, weights, excluded = make_logits()
    errors = {}

    def record(name, values, ref, grad_shard, ref_grad):
        err = torch.tensor([(values.double() - ref).abs().max(), (grad_shard.double() - shard(ref_grad, rank, tp)).abs().max()])
        dist.all_reduce(err, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
        errors[name] = err.tolist()

    for kind in KINDS:
        for top_k, renormalize in VARIANTS:
            cfg = DivergenceConfig(kind=kind, jsd_beta=0.3, top_k=top_k, renormalize_top_k=renormalize, chunk_tokens=8)
            s = shard(student, rank, tp).clone().requires_grad_()
            values = divergence(s, shard(teacher, rank, tp), cfg, excluded_columns=shard(excluded, rank, tp))
            (values * weights).sum().backward()
            s_ref = student.double().requires_grad_()
            ref = reference_divergence(s_ref, teacher, kind, 0.3, top_k, renormalize, excluded)
            (ref * weights.double()).sum().backward()
            record(f"{kind}-top{top_k}-renorm{renormalize}", values, ref, s.grad, s_ref.grad)

    # the teacher's top-k computed from its vocabulary shards (TeacherTopK), then the loss from it
    for kind in KINDS:
        for renormalize in (True, False):
            top = TeacherTopK.from_logits(shard(teacher, rank, tp), 9, shard(excluded, rank, tp), chunk_tokens=10)
            cfg = DivergenceConfig(kind=kind, jsd_beta=0.3, top_k=7, renormalize_top_k=renormalize, chunk_tokens=8)
            s = shard(student, rank, tp).clone().requires_grad_()
            values = divergence(s, top, cfg, excluded_columns=shard(excluded, rank, tp))
            (values * weights).sum().backward()
            s_ref = student.double().requires_grad_()
            ref = reference_divergence(s_ref, teacher, kind, 0.3, 7, renormalize, excluded)
            (ref * weights.double()).sum().backward()
            record(f"{kind}-teacher_top_k-renorm{renormalize}", values, ref, s.grad, s_ref.grad)

    real = (~excluded).nonzero().squeeze(1)
    targets = real[torch.randint(0, real.numel(), (student.shape[0],), generator=torch.Generator().manual_seed(1))]
    s = shard(student, rank, tp).clone().requires_grad_()
    nll = masked_diffusion_nll(s, targets, excluded_columns=shard(excluded, rank, tp), chunk_tokens=5)
    (nll * weights).sum().backward()
    s_ref = student.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(s_ref.masked_fill(excluded, float("-inf")), targets, reduction="none")
    (ref * weights.double()).sum().backward()
    record("cross_entropy", nll, ref, s.grad, s_ref.grad)

    return errors


def write(errors: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(errors, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with initialize_runtime(tensor_model_parallel_size=2, device="cpu"):
        errors = run_checks()
        if dist.get_rank() == 0:
            write(errors, args.out)


if __name__ == "__main__":
    main()
