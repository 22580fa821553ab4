"""Rollout throughput: the cached block-diffusion engine vs the naive full-recompute decoder vs the
AR model's greedy decoding with a KV cache in HF transformers ``generate``, measured in one run.

    python benchmarks/rollout_throughput.py [--random-weights] [--new-tokens 256] [--block-size 4]
        [--threshold 0.9] [--num-prompts 1] [--checkpoint DIR --hf-dir HF]

Weights: ``--checkpoint`` (an opdlm-megatron checkpoint) plus ``--hf-dir`` (the HF model it came
from) when given; else SmolLM2-135M through ``opdlm_megatron.tools.prepare_smollm2.ensure_smollm2``
and ``convert_hf_to_megatron.convert`` when those exist; else (or with ``--random-weights``) a
random model of SmolLM2-135M's shape, the same random weights in megatron and in HF.
EOS is ignored so that every decoder produces exactly ``--new-tokens`` tokens per prompt.
The last line reads ``speedup_vs_naive=X speedup_vs_ar=Y tokens_per_forward=Z``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.config import ModelConfig  # noqa: E402

SMOLLM2_135M = dict(
    num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
    vocab_size=49152, max_sequence_length=2048, rotary_base=100000.0, norm_epsilon=1e-5, tie_word_embeddings=True,
    block_size=4, logit_shift=True,
)
PROMPT_TEXT = [
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, there lived",
    "Question: What is the capital of France? Answer: The capital of France is Paris. Question: What is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, the first humans landed on the moon. The mission was called",
]


def _hf_llama_of_shape(config: ModelConfig):
    """A random HF LlamaForCausalLM of the same shape (random-weight mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.padded_vocab_size(1), hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.query_groups,
        max_position_embeddings=config.max_sequence_length, rope_theta=config.rotary_base,
        rms_norm_eps=config.norm_epsilon, tie_word_embeddings=True,
    ))
    # Throughput does not depend on the values, and EOS is ignored: a same-shape random model is
    # all the AR baseline needs (exact weight mapping lives in the conversion tools).
    return hf.eval()


def _load_models(args):
    """(megatron model, ModelConfig, HF model, prompts as token-id lists)."""
    from opdlm_megatron.checkpointing import build_from_checkpoint
    from opdlm_megatron.model import build_model

    hf_dir, ckpt = args.hf_dir, args.checkpoint
    if not args.random_weights and ckpt is None:
        try:
            from opdlm_megatron.tools.convert_hf_to_megatron import convert
            from opdlm_megatron.tools.prepare_smollm2 import ensure_smollm2

            hf_dir = hf_dir or ensure_smollm2()
            ckpt = os.path.join(tempfile.mkdtemp(prefix="opdlm-bench-"), "smollm2")
            convert(hf_dir, ckpt, add_mask_token=True, block_size=args.block_size, logit_shift=True)
        except Exception as error:  # noqa: BLE001 - fall back, and say so
            print(f"SmolLM2 weights unavailable ({type(error).__name__}: {error}); using random weights")
            ckpt, hf_dir = None, None
    if ckpt is not None and hf_dir is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, config = build_from_checkpoint(ckpt, "student")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXT]
        print(f"weights: SmolLM2 from {hf_dir} (converted checkpoint {ckpt})")
    else:
        config = ModelConfig(**SMOLLM2_135M)
        torch.manual_seed(0)
        model = build_model(config, "student")
        hf = _hf_llama_of_shape(config)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, config.vocab_size, (24 + 4 * i,), generator=g).tolist() for i in range(4)]
        print("weights: random, SmolLM2-135M shape")
    prompts = (prompts * args.num_prompts)[: args.num_prompts]
    return model, config.replace(block_size=args.block_size), hf, prompts


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--hf-dir", default=None)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--num-prompts", type=int, default=1)
    parser.add_argument("--skip-naive", action="store_true", help="(debug) skip the slow naive baseline")
    args = parser.parse_args()

    from opdlm_megatron.platform import initialize_runtime
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine

    with initialize_runtime(device="cpu", seed=0):
        model, config, hf, prompts = _load_models(args)
        model.eval()
        engine = DiffusionRolloutEngine(model, config)
        n_tokens = args.new_tokens * len(prompts)
        decode = DecodeConfig(max_new_tokens=args.new_tokens, block_size=args.block_size,
                              threshold=args.threshold, eos_token_ids=[])
        print(f"threads={torch.get_num_threads()} prompts={len(prompts)} new_tokens={args.new_tokens} "
              f"block={args.block_size} threshold={args.threshold}")

        engine.generate(prompts, DecodeConfig(max_new_tokens=args.block_size, eos_token_ids=[]))  # warm-up
        cached, t_cached = _timed(lambda: engine.generate(prompts, decode))
        rate_cached = n_tokens / t_cached
        fwd_per_tok = cached.num_forward_passes / args.new_tokens
        print(f"(a) engine (KV cache)   : {rate_cached:8.1f} tok/s  {fwd_per_tok:.3f} forwards/token  "
              f"{t_cached:.1f}s")

        if args.skip_naive:
            rate_naive = float("nan")
        else:
            naive, t_naive = _timed(lambda: engine.generate(prompts, DecodeConfig(**{**decode.__dict__, "use_cache": False})))
            rate_naive = n_tokens / t_naive
            same = torch.equal(naive.answer_ids, cached.answer_ids)
            print(f"(b) naive full recompute: {rate_naive:8.1f} tok/s  "
                  f"{naive.num_forward_passes / args.new_tokens:.3f} forwards/token  {t_naive:.1f}s  "
                  f"same tokens as (a): {same}")

        with torch.no_grad():
            t_ar, ar_forwards = 0.0, 0
            for prompt in prompts:  # batch 1 each: no padding effects in HF
                ids = torch.tensor([prompt])
                hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
                out, seconds = _timed(lambda: hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                     do_sample=False, use_cache=True, pad_token_id=0))
                ar_forwards += out.shape[1] - ids.shape[1]
                t_ar += seconds
        rate_ar = n_tokens / t_ar
        print(f"(c) HF AR generate      : {rate_ar:8.1f} tok/s  {ar_forwards / n_tokens:.3f} forwards/token  "
              f"{t_ar:.1f}s")
        print(f"engine/naive = {rate_cached / rate_naive:.2f}x (goal >= 8x), engine/AR = {rate_cached / rate_ar:.2f}x "
              f"(goal >= 1.5x)")
        print(f"speedup_vs_naive={rate_cached / rate_naive:.2f} speedup_vs_ar={rate_cached / rate_ar:.2f} "
              f"tokens_per_forward={args.new_tokens / cached.num_forward_passes:.3f}")


if __name__ == "__main__":
    main()
