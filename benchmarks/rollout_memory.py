"""Rollout memory under load: peak resident memory of one rollout of N prompts at the curriculum's
final length, for N = 32, 64, 128, each in a fresh process (so every peak is its own).

    python benchmarks/rollout_memory.py            # 32/64/128 prompts x 4,000 new tokens (minutes)
    python benchmarks/rollout_memory.py --quick    # 8/16/32 prompts x 64 tokens (CI)

The model is the tiny random student of the training tests (4 layers, hidden 64, 250 tokens;
``--layers``/``--hidden`` to change it), decoded by the rollout engine (KV cache) with EOS ignored,
so every prompt produces exactly ``--new-tokens`` tokens; ``--tokens-per-step`` commits that many
per forward (a static rule keeps the run short and its memory the same as a thresholded one's: the
cache holds every committed token either way). What is measured in each child: the process's peak
RSS (``ru_maxrss``) before the rollout (model built, prompts ready) and after it; the rollout's
share is the difference.

The engine's state grows linearly with prompts x length (the KV cache: 2 x layers x hidden per
token), so the growth from 64 to 128 prompts should be about twice the growth from 32 to 64 (a
quadratic cost would make it four times). The last line reads
``prompts=A,B,C rollout_mb=X,Y,Z growth_ratio=R linear=yes|no`` with R = (Z - Y) / (Y - X) and
linear = yes when R < 3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args) -> None:
    import torch

    from opdlm_megatron.distill.answers import engine_rollout
    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.rollout.config import DecodeConfig

    prompt_len = 24
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 5 // 2,
                         num_attention_heads=4, num_query_groups=2, vocab_size=250,
                         max_sequence_length=prompt_len + args.new_tokens + 8, eos_token_ids=[2], block_size=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (prompt_len,), generator=g).tolist() for _ in range(int(args.prompts))]
    with initialize_runtime(device="cpu", seed=1):
        model = build_model(config, "student")
        model.eval()
        decode = DecodeConfig(max_new_tokens=args.new_tokens, threshold=1.0, temperature=0.0,
                              tokens_per_step=args.tokens_per_step, eos_token_ids=[])
        before = _peak_mb()
        start = time.time()
        with torch.no_grad():
            result = engine_rollout(model, config, prompts, decode)
        seconds = time.time() - start
        after = _peak_mb()
    tokens = int(result.answer_valid.sum())
    print(json.dumps(dict(prompts=int(args.prompts), tokens=tokens, before_mb=before, after_mb=after,
                          rollout_mb=after - before, seconds=seconds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", default="32,64,128")
    parser.add_argument("--new-tokens", type=int, default=4000)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.prompts, args.new_tokens = "8,16,32", 64
    counts = [int(x) for x in args.prompts.split(",")]
    if len(counts) != 3 or sorted(counts) != counts or len(set(counts)) != 3:
        parser.error(f"--prompts must be three increasing counts, got {args.prompts!r}")
    rows = []
    for n in counts:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--prompts", str(n), "--new-tokens",
               str(args.new_tokens), "--tokens-per-step", str(args.tokens_per_step), "--layers", str(args.layers),
               "--hidden", str(args.hidden)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ,
                             CUDA_VISIBLE_DEVICES=""))
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:4d} prompts x {args.new_tokens} tokens: {row['tokens']} tokens decoded in {row['seconds']:.1f} s, "
              f"peak RSS {row['before_mb']:.0f} MB before -> {row['after_mb']:.0f} MB after "
              f"(rollout {row['rollout_mb']:.0f} MB)", flush=True)
    x, y, z = (r["rollout_mb"] for r in rows)
    ratio = (z - y) / max(y - x, 1e-9)
    print(f"prompts={','.join(map(str, counts))} rollout_mb={x:.0f},{y:.0f},{z:.0f} growth_ratio={ratio:.2f} "
          f"linear={'yes' if ratio < 3 else 'no'}")


if __name__ == "__main__":
    main()
