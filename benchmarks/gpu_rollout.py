"""What a rollout costs where users run it: the engine against HF ``generate`` with its KV cache, on a GPU.

    python benchmarks/gpu_rollout.py                        # on a CUDA machine (H100 / H200), bf16
    python benchmarks/gpu_rollout.py --quick --device cpu   # the code path on CPU (CI)

For each model shape (random weights: speed does not depend on the values; SmolLM2-135M's shape and a
~1.7B Qwen3-like one, QK-norm and 151k vocabulary) and each batch size (1 and 64), the same prompts are
decoded to exactly ``--new-tokens`` answer tokens (end of answer ignored on both sides, so both decode the
same number of tokens) by

* HF ``generate`` (greedy, its KV cache, SDPA attention) of a HF model of the same shape and dtype, and
* the project's engine (block 4, KV-cached finished blocks, ``forward_impl=auto``) committing a fixed
  ``k`` tokens per forward (``tokens_per_step = k``, k = 1, 2, 4): what a trained student reaching k
  tokens per forward pays. k = 1 is the engine's overhead against AR decoding: a block step runs b
  columns where an AR step runs one.

Answer tokens per second of each, and ``engine / HF`` at each k. Without a CUDA GPU ``--device cuda``
prints one line and exits 0 (``scripts/gpu_checks.sh`` runs it unconditionally). Last line:
``gpu_rollout device=D engine_over_hf_b1_k1=A engine_over_hf_b1_k4=B engine_over_hf_b64_k1=C
engine_over_hf_b64_k4=E`` (the largest shape measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.config.model import ModelConfig  # noqa: E402

SHAPES = {
    "smollm2_135m": dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                         num_query_groups=3, vocab_size=49152, rotary_base=100000.0, norm_epsilon=1e-5,
                         tie_word_embeddings=True),
    "qwen3_1p7b": dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, vocab_size=151936, rotary_base=1000000.0,
                       norm_epsilon=1e-6, qk_layernorm=True, tie_word_embeddings=True),
    # --quick: both HF paths (Llama; Qwen3 with QK-norm and head_dim != hidden / heads) in seconds
    "tiny_llama": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       vocab_size=512, rotary_base=10000.0, norm_epsilon=1e-5, tie_word_embeddings=True),
    "tiny_qwen3": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       kv_channels=32, vocab_size=512, rotary_base=10000.0, norm_epsilon=1e-6, qk_layernorm=True,
                       tie_word_embeddings=True),
}


def hf_model_of_shape(config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """A random HF model of the same shape: Llama, or Qwen3 where the shape has QK-norm."""
    common = dict(vocab_size=config.padded_vocab_size(1), hidden_size=config.hidden_size,
                  intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.query_groups,
                  max_position_embeddings=config.max_sequence_length, rope_theta=config.rotary_base,
                  rms_norm_eps=config.norm_epsilon, tie_word_embeddings=config.tie_word_embeddings,
                  head_dim=config.head_dim)
    if config.qk_layernorm:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device: torch.device, repeats: int):
    """Best of ``repeats`` wall-clock runs (after one warm-up), synchronised on a GPU."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_shape(name: str, args, device: torch.device) -> dict:
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine

    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    config = ModelConfig(**SHAPES[name], max_sequence_length=args.prompt_tokens + args.new_tokens + 64, block_size=4,
                         params_dtype=dtype_name)
    torch.manual_seed(0)
    student = build_model(config, "student").eval()
    hf = hf_model_of_shape(config, dtype, device)
    engine = DiffusionRolloutEngine(student, config)
    print(f"{name}: engine forward {'fused' if engine.forward_reason is None else 'megatron (' + engine.forward_reason + ')'}"
          f", {dtype_name}", flush=True)
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in args.batches:
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens), generator=g)
        prompts = ids.tolist()
        tokens = batch * args.new_tokens

        def hf_run():
            with torch.no_grad():
                hf.generate(ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                            use_cache=True, pad_token_id=0)

        hf_rate = tokens / timed(hf_run, device, args.repeats)
        row = {"hf": hf_rate}
        for k in args.tokens_per_forward:
            decode = DecodeConfig(max_new_tokens=args.new_tokens, block_size=4, tokens_per_step=k, eos_token_ids=[])
            rate = tokens / timed(lambda: engine.generate(prompts, decode), device, args.repeats)
            row[k] = rate
            result = engine.generate(prompts, decode)  # what was timed: every answer full length, k per forward
            lengths = {len(c) for c in result.completions()}
            if lengths != {args.new_tokens} or result.num_forward_passes != args.new_tokens // k:
                raise SystemExit(f"gpu_rollout: error: the engine decoded answer lengths {sorted(lengths)} in "
                                 f"{result.num_forward_passes} forwards; expected {args.new_tokens} in "
                                 f"{args.new_tokens // k}")
        out[batch] = row
        print(f"  batch {batch:3d} (engine: every answer {args.new_tokens} tokens, new_tokens / k forwards): HF generate {hf_rate:10.1f} tok/s | engine "
              + " | ".join(f"k={k}: {row[k]:10.1f} tok/s ({row[k] / hf_rate:.2f}x)" for k in args.tokens_per_forward),
              flush=True)
    student = hf = engine = None  # frees the device memory before the next shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default="smollm2_135m,qwen3_1p7b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--tokens-per-forward", default="1,2,4")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes, batches 1 and 2, 8 new tokens (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.batches, args.new_tokens, args.prompt_tokens, args.repeats = "tiny_llama,tiny_qwen3", "1,2", 8, 8, 1
    try:
        args.shapes = [s for s in args.shapes.split(",") if s]
        args.batches = [int(b) for b in args.batches.split(",") if b]
        args.tokens_per_forward = [int(k) for k in args.tokens_per_forward.split(",") if k]
    except ValueError as error:
        p.error(f"--batches and --tokens-per-forward take comma-separated integers ({error})")
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad or not args.shapes:
        p.error(f"--shapes {bad or args.shapes}: choose from {sorted(SHAPES)}")
    if any(b < 1 for b in args.batches) or any(k not in (1, 2, 4) for k in args.tokens_per_forward):
        p.error("--batches must be positive; --tokens-per-forward takes 1, 2 or 4 (block 4)")
    if args.new_tokens < 4 or args.new_tokens % 4:
        p.error(f"--new-tokens {args.new_tokens}: a positive multiple of the block size 4")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_rollout: skipped: no CUDA GPU here (python benchmarks/gpu_rollout.py --quick --device cpu checks "
              "the code path)")
        return
    from opdlm_megatron.runtime.platform import initialize_runtime

    with initialize_runtime(device=args.device, seed=0) as rt:
        device_name = torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu"
        print(f"device={device_name} new_tokens={args.new_tokens} prompt_tokens={args.prompt_tokens}", flush=True)
        results = {name: measure_shape(name, args, rt.device) for name in args.shapes}
    last = results[args.shapes[-1]]
    nan = float("nan")

    def ratio(batch, k):
        row = last.get(batch)
        return row[k] / row["hf"] if row and k in row else nan

    small, large = min(args.batches), max(args.batches)
    print(f"gpu_rollout device={device_name.replace(' ', '_')} "
          f"engine_over_hf_b{small}_k1={ratio(small, 1):.2f} engine_over_hf_b{small}_k4={ratio(small, 4):.2f} "
          f"engine_over_hf_b{large}_k1={ratio(large, 1):.2f} engine_over_hf_b{large}_k4={ratio(large, 4):.2f}")


if __name__ == "__main__":
    main()
