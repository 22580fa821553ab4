"""The student's training step on a GPU: model TFLOP/s and MFU per layer implementation, attention
kernel and precision, with the activation memory against the planner's count.

    python benchmarks/gpu_student_step.py                       # on a CUDA machine (H100 / H200)
    python benchmarks/gpu_student_step.py --quick --device cpu  # the code path on CPU (CI)

One forward + backward of the student over a micro-batch of ``[prompt | x0 | xt]`` rows (megatron's
schedule, the trainer's ``student_step``; a random model of ``--layers`` x ``--hidden`` with GQA and
SwiGLU, random teacher targets), for each variant that this machine can run:

* ``local-dense``: megatron's local spec, dense attention (what CPUs train with);
* ``local-flex``: the local spec with FlexAttention (no Transformer Engine needed);
* ``te-dense``: Transformer Engine's spec; the arbitrary mask makes TE run unfused attention;
* ``te-flex``: TE's spec with FlexAttention for the student layout (compiled; the GPU default);
* ``te-flex-fp8``: the same with FP8 GEMMs (hybrid, tensorwise), needs sm_89+.

Model FLOPs per step: 6 x (transformer-layer parameters) x tokens, + 12 x layers x heads x head_dim x
(attended query-key pairs of the actual mask), + 6 x hidden x vocab x supervised tokens (the output
layer runs on the supervised columns only). MFU = model FLOP/s / the GPU's dense peak (``--peak-tflops``;
default by device name: H100/H200 989 BF16, FP8 twice that). The activation peak is
``max_memory_allocated`` during the step minus the memory before it, against ``activations.py``.

The last line reads ``variant=te-flex bf16_tflops=X bf16_mfu=Y fp8_tflops=Z fp8_speedup=W
flex_over_dense=V activation_estimate_over_peak=U`` (the TE variants, else local-flex, else
local-dense; ``nan`` where a variant could not run: without Transformer Engine no TE / FP8 numbers).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.planning.activations import ActivationShape, activation_bytes  # noqa: E402
from opdlm_megatron.config.model import ModelConfig  # noqa: E402
from opdlm_megatron.model.losses import DivergenceConfig  # noqa: E402
from opdlm_megatron.model.masks import opd_training_batch  # noqa: E402
from opdlm_megatron.model.build import build_model  # noqa: E402
from opdlm_megatron.objectives.base import SupervisedBatch  # noqa: E402
from opdlm_megatron.runtime.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.config.precision import PrecisionConfig  # noqa: E402
from opdlm_megatron.distill.states import select_states  # noqa: E402
from opdlm_megatron.training.student import student_step  # noqa: E402
from opdlm_megatron.distill.teacher import TeacherTargets  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}
VARIANTS = {  # name: (transformer_impl, attention_backend, fp8)
    "local-dense": ("local", "dense", None),
    "local-flex": ("local", "flex", None),
    "te-dense": ("transformer_engine", "dense", None),
    "te-flex": ("transformer_engine", "flex", None),
    "te-flex-fp8": ("transformer_engine", "flex", "hybrid"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--answer-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4, help="rows of the micro-batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, default=None, help="dense BF16 peak of the GPU (TFLOP/s)")
    p.add_argument("--quick", action="store_true", help="a tiny model and batch (checks the code path)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.groups, args.ffn, args.vocab = 2, 64, 4, 2, 128, 512
        args.prompt_len, args.answer_len, args.rows, args.repeats = 16, 32, 2, 2
    return args


def runnable(variant: str, device: str):
    """None if ``variant`` runs here, else why not."""
    impl, backend, fp8 = VARIANTS[variant]
    if device == "cpu":
        return None if variant == "local-dense" else "GPU only"
    if impl == "transformer_engine":
        try:
            from megatron.core.extensions.transformer_engine import HAVE_TE
        except ImportError:
            HAVE_TE = False
        if not HAVE_TE:
            return "Transformer Engine is not installed"
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        return "FP8 needs sm_89+"
    return None


def opd_batch(config: ModelConfig, args):
    """A synthetic rollout's OPD batch with about half of every row's answer masked."""
    from tests.distributed.student_data import synthetic_rollout

    rollout = synthetic_rollout(config.vocab_size, config.block_size, batch_size=args.rows, prompt_len=args.prompt_len,
                                answer_len=args.answer_len, seed=0)
    xt = select_states(rollout, "block", torch.Generator().manual_seed(0), config.mask_token_id,
                       block_size=config.block_size)
    supervised = (xt == config.mask_token_id) & rollout.answer_valid
    return SupervisedBatch(rollout, supervised, supervised, distill=True, layout="opd", xt=xt), rollout, xt


def attended_pairs(config: ModelConfig, rollout, xt) -> int:
    opd = opd_training_batch(rollout.prompt_ids, rollout.prompt_valid, rollout.answer_ids, xt, rollout.answer_valid,
                             config.block_size)
    return int((~opd.layout.dense_mask()).sum())


def measure(variant: str, args, device: torch.device):
    impl, backend, fp8 = VARIANTS[variant]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                         num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                         max_sequence_length=args.prompt_len + 2 * args.answer_len + 64, block_size=4,
                         transformer_impl=impl, attention_backend=backend, params_dtype=dtype)
    precision = PrecisionConfig(fp8=fp8, fp8_recipe="tensorwise") if fp8 else None
    model = build_model(config, "student", precision=precision)
    batch, rollout, xt = opd_batch(config, args)
    logits = torch.randn(args.rows, args.answer_len, config.padded_vocab_size(1), device=device)
    targets = TeacherTargets.dense(logits, (args.rows, args.answer_len))
    divergence = DivergenceConfig()

    def step():
        model.zero_grad(set_to_none=True)
        return student_step(model, config, batch, targets, divergence, args.rows)

    for _ in range(2):  # warm-up (FlexAttention compiles, TE picks kernels)
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before = 0
    if device.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    best = math.inf
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else float("nan")

    seq = args.prompt_len + 2 * args.answer_len
    tokens = args.rows * seq
    supervised = int(batch.supervised.sum())
    layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    flops = (6 * layer_params * tokens
             + 12 * config.num_layers * config.num_attention_heads * config.head_dim * attended_pairs(config, rollout, xt)
             + 6 * config.hidden_size * config.padded_vocab_size(1) * supervised)
    estimate = activation_bytes(config, ActivationShape(seq, args.rows, supervised))
    return dict(seconds=best, tflops=flops / best / 1e12, peak=peak, estimate=estimate)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_student_step: error: --device cuda needs a CUDA GPU (use --device cpu --quick for the code path)",
              file=sys.stderr)
        sys.exit(2)
    with initialize_runtime(device=args.device, seed=0) as rt:
        peak = args.peak_tflops
        if peak is None and rt.device.type == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
        print(f"device={torch.cuda.get_device_name() if rt.device.type == 'cuda' else 'cpu'} layers={args.layers} "
              f"hidden={args.hidden} rows={args.rows} columns={args.prompt_len + 2 * args.answer_len} "
              f"peak_bf16={peak} TFLOP/s")
        results = {}
        for variant in VARIANTS:
            why = runnable(variant, rt.device.type)
            if why:
                print(f"{variant:12s} skipped: {why}")
                continue
            r = results[variant] = measure(variant, args, rt.device)
            variant_peak = (peak or float("nan")) * (2 if VARIANTS[variant][2] else 1)
            print(f"{variant:12s} {r['seconds'] * 1e3:9.1f} ms  {r['tflops']:8.2f} TFLOP/s  "
                  f"MFU {r['tflops'] / variant_peak:.3f}  activation peak {r['peak'] / 2**30:.2f} GiB, "
                  f"estimate {r['estimate'] / 2**30:.2f} GiB")

    nan = float("nan")
    impl = "te" if "te-flex" in results else "local"
    main_variant = f"{impl}-flex" if f"{impl}-flex" in results else "local-dense"
    bf16 = results.get(main_variant, {})
    fp8 = results.get("te-flex-fp8", {})
    dense = results.get(f"{impl}-dense", {}) if main_variant.endswith("flex") else {}
    print(f"variant={main_variant} bf16_tflops={bf16.get('tflops', nan):.3g} "
          f"bf16_mfu={bf16.get('tflops', nan) / (peak or nan):.3f} fp8_tflops={fp8.get('tflops', nan):.3g} "
          f"fp8_speedup={bf16.get('seconds', nan) / fp8.get('seconds', nan):.2f} "
          f"flex_over_dense={dense.get('seconds', nan) / bf16.get('seconds', nan):.2f} "
          f"activation_estimate_over_peak={bf16.get('estimate', nan) / bf16.get('peak', nan):.2f}")


if __name__ == "__main__":
    main()
