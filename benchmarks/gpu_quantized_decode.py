"""What ModelOpt quantization does to the speed of block-diffusion decoding, on a GPU.

    python benchmarks/gpu_quantized_decode.py                        # on a CUDA machine, bf16
    python benchmarks/gpu_quantized_decode.py --quick --device cpu   # the code path on CPU (CI)

A random student of SmolLM2-135M's shape (speed does not depend on the values) decodes the same prompts to
exactly ``--new-tokens`` answer tokens, ``k`` per forward (block 4), unquantized and quantized with each
format (calibrated on one decoding of the prompts; ``nvfp4`` on CUDA only). Every variant decodes through
megatron's forward (a quantized model cannot take the fused decoding forward), so the unquantized
megatron-forward run is the baseline of the ratios; the fused forward's rate is printed beside it. What this
measures is ModelOpt's *fake* quantization (rounding in the model's dtype, as during training and
calibration): serving speed-ups come from the exported checkpoint in TensorRT-LLM / vLLM, not from here.
Without a CUDA GPU ``--device cuda`` prints one line and exits 0 (``scripts/gpu_checks.sh`` runs it
unconditionally); without ModelOpt it says so and exits 0. Last line: ``gpu_quantized_decode device=D
fp8_over_unquantized=A int8_sq_over_unquantized=B nvfp4_over_unquantized=C`` (batch ``--batch``, k = 4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_rollout import SHAPES, timed  # noqa: E402

from opdlm_megatron.config.model import ModelConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shape", default="smollm2_135m", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny shape, batch 2, 8 new tokens (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.batch, args.new_tokens, args.prompt_tokens, args.repeats = "tiny_llama", 2, 8, 8, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_quantized_decode: skipped: no CUDA GPU here (--quick --device cpu checks the code path)")
        return
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        print("gpu_quantized_decode: skipped: NVIDIA ModelOpt is not installed (pip install 'opdlm-megatron[modelopt]')")
        return
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.model.quantization import CUDA_ONLY_FORMATS, QUANT_FORMATS, quantize
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
    from opdlm_megatron.runtime.platform import initialize_runtime

    with initialize_runtime(device=args.device, seed=0) as rt:
        device = rt.device
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        config = ModelConfig(**SHAPES[args.shape], max_sequence_length=args.prompt_tokens + args.new_tokens + 64,
                             block_size=4, params_dtype=dtype_name)
        torch.manual_seed(0)
        weights = build_model(config, "student").eval().state_dict()
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_tokens), generator=g).tolist()
        tokens = args.batch * args.new_tokens
        decode = DecodeConfig(max_new_tokens=args.new_tokens, block_size=4, tokens_per_step=4, eos_token_ids=[])
        print(f"device={device_name} shape={args.shape} {dtype_name} batch={args.batch} new_tokens={args.new_tokens} "
              f"k=4", flush=True)
        rates = {}
        for variant in ["fused", "unquantized"] + list(QUANT_FORMATS):
            if variant in CUDA_ONLY_FORMATS and device.type != "cuda":
                print(f"  {variant:12s} skipped: CUDA only", flush=True)
                continue
            model = build_model(config, "student").eval()
            model.load_state_dict(weights)
            if variant in QUANT_FORMATS:
                quantize(model, variant, lambda m: DiffusionRolloutEngine(m, config, forward_impl="megatron").generate(
                    prompts, decode))
            engine = DiffusionRolloutEngine(model, config, forward_impl="fused" if variant == "fused" else "megatron")
            rates[variant] = tokens / timed(lambda: engine.generate(prompts, decode), device, args.repeats)
            print(f"  {variant:12s} {rates[variant]:10.1f} tok/s", flush=True)
            model = engine = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def ratio(fmt):
        return rates[fmt] / rates["unquantized"] if fmt in rates else float("nan")

    print(f"gpu_quantized_decode device={device_name.replace(' ', '_')} fp8_over_unquantized={ratio('fp8'):.2f} "
          f"int8_sq_over_unquantized={ratio('int8_sq'):.2f} nvfp4_over_unquantized={ratio('nvfp4'):.2f}")


if __name__ == "__main__":
    main()
