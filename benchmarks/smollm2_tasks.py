"""Which reasoning-gym tasks can say something about a SmolLM2-135M-Instruct conversion?

    python benchmarks/smollm2_tasks.py [--prompts 200] [--max-new-tokens 48]

Greedy AR accuracy of SmolLM2-135M-Instruct (the teacher of the main job) on held-out prompts of a
few reasoning-gym tasks and difficulty settings, through the same decoding and scorers as
``opdlm-eval`` (chat template, system prompt "Answer with the number only."), with the share of
answers that hit the length limit and the mean answer length. A task is useful for measuring a
conversion when the teacher is well above 0 and below 1. The last line names the chosen task:
``chosen=TASK teacher_acc=A``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = [
    ("basic_arithmetic", {}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                          "operators": ["+", "-"]}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    ("gsm_symbolic", {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--system-prompt", default="Answer with the number only.")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "smollm2_tasks.json"))
    args = p.parse_args()

    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.data.samples import load_tokenizer
    from opdlm_megatron.eval.metrics import summarize_run
    from opdlm_megatron.eval.runner import ar_config, generate, score_generations, teacher_decode
    from opdlm_megatron.eval.tasks import TaskSpec, load_task
    from opdlm_megatron.eval.evaluation import encode
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.rollout.config import DecodeConfig
    from opdlm_megatron.tools.convert_hf_to_megatron import ensure_converted_smollm2

    ckpt = ensure_converted_smollm2(block_size=4)
    tokenizer = load_tokenizer(os.path.join(ckpt, "tokenizer"))
    rows = []
    with initialize_runtime(device="cpu", seed=0):
        model, config = build_from_checkpoint(ckpt, "teacher")
        for task, options in SETTINGS:
            items = load_task(TaskSpec(task, options=options, num_samples=args.prompts, seed=999))
            prompts = encode(items, tokenizer, True, args.system_prompt)
            decode = teacher_decode(DecodeConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=config.eos_token_ids))
            gens = generate(model, ar_config(config), prompts, decode, args.batch_size)
            result = summarize_run(score_generations(items, gens, tokenizer, "teacher", "ar", 0))
            rows.append({"task": task, "options": options, **result})
            print(f"{task:18s} {json.dumps(options):90s} acc {result['accuracy']:.3f} ±{result['accuracy_se']:.3f} "
                  f"len {result['mean_answer_tokens']:.1f} limit {result['hit_length_limit']:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    useful = [r for r in rows if 0.2 <= r["accuracy"] <= 0.9] or rows
    best = max(useful, key=lambda r: r["accuracy"])
    print(f"chosen={best['task']}:{json.dumps(best['options'], separators=(',', ':'))} teacher_acc={best['accuracy']:.3f}")


if __name__ == "__main__":
    main()
