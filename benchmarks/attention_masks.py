"""Dense vs FlexAttention paths of the OPD training layout ``[prompt | x0 | xt]``.

Prints, from one run: the fraction of attention tiles the structured (BlockMask) path skips, the
student forward+backward (GPU) or forward (CPU: torch has no FlexAttention backward there) time with each backend on the same weights and batch, and their ratio.
On CPU, eager FlexAttention is torch's reference implementation (it materialises the scores), so
the speed ratio there says little; pass ``--compile`` to time the inductor-compiled kernel, and run
on a GPU for the numbers that matter. The last line reads
``tile_sparsity=X flex_over_dense=Y``.

    python benchmarks/attention_masks.py [--prompt 64 --answer 192 --batch 2 --layers 4]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--answer", type=int, default=192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile FlexAttention (inductor)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from opdlm_megatron.model import masks
    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.model.build import attention_mask, build_model
    from opdlm_megatron.runtime.platform import initialize_runtime

    with initialize_runtime(device=args.device) as rt:
        # SmolLM2-135M attention shape (9 heads, 3 KV groups, head dim 64), fewer layers
        config = ModelConfig(num_layers=args.layers, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                             num_query_groups=3, vocab_size=49152, max_sequence_length=4096,
                             block_size=args.block_size)
        torch.manual_seed(0)
        p, a, b = args.prompt, args.answer, args.batch
        prompt = torch.randint(0, config.vocab_size, (b, p))
        x0 = torch.randint(0, config.vocab_size, (b, a))
        xt = torch.where(torch.rand(b, a) < 0.5, torch.full_like(x0, config.mask_token_id), x0)
        opd = masks.opd_training_batch(prompt, torch.ones(b, p, dtype=torch.bool), x0, xt,
                                       torch.ones(b, a, dtype=torch.bool), config.block_size)
        layout = opd.layout.to(rt.device)
        ids = opd.input_ids.to(rt.device)

        block_mask = layout.flex_block_mask(compile=args.compile)
        tiles = block_mask.to_dense()
        sparsity = 1.0 - tiles.float().mean().item()

        # torch's FlexAttention has no CPU backward: time the forward there, forward+backward on GPU
        train = rt.device.type == "cuda"
        results = {}
        dense_model = build_model(config, "student")
        for backend in ("dense", "flex"):
            cfg = config.replace(attention_backend=backend)
            model = dense_model if backend == "dense" else build_model(cfg, "student")
            if backend == "flex":
                model.load_state_dict(dense_model.state_dict())
                if args.compile and rt.device.type == "cpu":
                    import opdlm_megatron.model.attention as attention_module
                    from torch.nn.attention.flex_attention import flex_attention

                    attention_module._flex_attention_fn = lambda device, _f=torch.compile(flex_attention): _f
            mask = attention_mask(cfg, layout)
            times = []
            for i in range(args.repeats + 1):
                start = time.perf_counter()
                if train:
                    model(ids, layout.position_ids, mask).float().pow(2).mean().backward()
                    model.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        model(ids, layout.position_ids, mask)
                if i:  # first run warms up (and compiles)
                    times.append(time.perf_counter() - start)
            results[backend] = min(times)
            print(f"{backend:>5}: {'fwd+bwd' if train else 'fwd'} {results[backend] * 1e3:.1f} ms (seq {ids.shape[1]}, batch {b})")
        print(f"tile_sparsity={sparsity:.3f} flex_over_dense={results['flex'] / results['dense']:.3f}")


if __name__ == "__main__":
    main()
