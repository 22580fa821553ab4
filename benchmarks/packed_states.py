"""What packing an answer's states into one row saves the student's step (``loss.pack_states``).

    python benchmarks/packed_states.py            # SmolLM2-135M's shape, the families run's batch (minutes)
    python benchmarks/packed_states.py --quick    # a tiny model (the code path; CI)

With ``loss.state_selection=all_rounds`` every round of every block is a state, so an answer decoded at
one token per forward gives ``block_size`` states. One row per state, ``[prompt | x0 | xt]``, forwards the
prompt and x0 once per state; packed, ``[prompt | x0 | xt_1 | .. | xt_R]``, once per answer, with each copy
attending exactly as in a row of its own (``masks.opd_packed_training_batch``).

A random student of ``--layers`` x ``--hidden`` (SmolLM2-135M's shape by default: 30 x 576, 9 heads, 3
KV groups, FFN 1536, vocabulary 49152), ``--answers`` answers of ``--answer-lengths`` tokens (padded to
``--answer-len``) committed one per round (the families run's rollouts: 0.93-0.98 tokens per forward),
prompts of ``--prompt-len``, random teacher
targets, micro-batches of ``--answers-per-microbatch`` answers as the run has them; the trainer's
``student_step`` (megatron's schedule) with ``pack_states`` off and on, alternating, ``--repeats`` times
each, on the same batch. Both give the same loss and gradients (checked here: relative differences
printed). The last line reads ``packed_states tokens_ratio=X step_speedup=Y loss_rel_diff=Z
grad_rel_diff=W`` (X: input columns per step unpacked / packed; Y: median step time unpacked / packed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_megatron.config.model import ModelConfig  # noqa: E402
from opdlm_megatron.distill.states import all_round_states  # noqa: E402
from opdlm_megatron.distill.teacher import TeacherTargets  # noqa: E402
from opdlm_megatron.model.build import build_model  # noqa: E402
from opdlm_megatron.model.losses import DivergenceConfig  # noqa: E402
from opdlm_megatron.objectives.base import masked_state_batch, StateContext  # noqa: E402
from opdlm_megatron.rollout.types import RolloutResult  # noqa: E402
from opdlm_megatron.runtime.platform import initialize_runtime  # noqa: E402
from opdlm_megatron.training.student import StudentStepPlan, student_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=80)
    p.add_argument("--answer-len", type=int, default=48)
    p.add_argument("--answer-lengths", default="43,27,9,12",
                   help="the answers' lengths, cycled (default: the teacher's mean answer length on count_up, "
                        "numbered_list, copy_sentence and chain_sum, BENCHMARKS.md); every answer is padded to "
                        "--answer-len as a rollout pads them to its longest")
    p.add_argument("--answers", type=int, default=8, help="answers in the step (the families run's batch)")
    p.add_argument("--answers-per-microbatch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a tiny model and batch (checks the code path)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.groups, args.ffn, args.vocab = 2, 64, 4, 2, 128, 512
        args.prompt_len, args.answer_len, args.answers, args.repeats, args.answer_lengths = 12, 16, 3, 1, "16,5"
    return args


def one_per_round_rollout(config: ModelConfig, args) -> RolloutResult:
    """Answers committed one token per round (every block has ``block_size`` distinct rounds)."""
    g = torch.Generator().manual_seed(0)
    n, plen, alen = args.answers, args.prompt_len, args.answer_len
    prompt_ids = torch.randint(3, config.vocab_size, (n, plen), generator=g)
    answer_ids = torch.randint(3, config.vocab_size, (n, alen), generator=g)
    lengths = [int(x) for x in args.answer_lengths.split(",")]
    lengths = torch.tensor([min(alen, lengths[b % len(lengths)]) for b in range(n)])
    valid = torch.arange(alen)[None] < lengths[:, None]
    commit = torch.where(valid, torch.arange(alen)[None], -1)
    answer_ids = answer_ids.masked_fill(~valid, 0)
    return RolloutResult(prompt_ids, torch.ones(n, plen, dtype=torch.bool), answer_ids, valid, commit,
                         lengths, torch.ones(n, dtype=torch.bool), alen)


def main(argv=None) -> int:
    args = parse_args(argv)
    with initialize_runtime(device="cpu", seed=0):
        config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                             num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                             max_sequence_length=args.prompt_len + (1 + args.block_size) * args.answer_len + 8,
                             block_size=args.block_size, logit_shift=True)
        model = build_model(config, "student")
        rollout = one_per_round_rollout(config, args)
        ctx = StateContext(mask_token_id=config.mask_token_id, block_size=config.block_size,
                           end_of_turn_ids=(), state_selection="all_rounds")
        source, xt = all_round_states(rollout, config.block_size, config.mask_token_id)
        batch = masked_state_batch(rollout.rows(source, trim=False), xt, ctx, distill=True, groups=source)
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(batch.batch_size, args.answer_len, config.padded_vocab_size(1), generator=g)
        targets = TeacherTargets.dense(logits, (batch.batch_size, args.answer_len))
        divergence = DivergenceConfig()
        mbs = args.answers_per_microbatch

        columns = {}
        for packed in (False, True):
            plan = StudentStepPlan(model, config, batch, targets, divergence, mbs, pack_states=packed)
            columns[packed] = sum(int(mb["ids"].numel()) for mb in plan.microbatches)

        def step(packed: bool):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = student_step(model, config, batch, targets, divergence, mbs, pack_states=packed)
            elapsed = time.perf_counter() - start
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            return elapsed, out["loss"], grads

        times = {False: [], True: []}
        results = {}
        step(False)  # warm-up
        for _ in range(args.repeats):
            for packed in (False, True):
                elapsed, loss, grads = step(packed)
                times[packed].append(elapsed)
                results[packed] = (loss, grads)
        (loss0, grad0), (loss1, grad1) = results[False], results[True]
        loss_diff = abs(loss1 - loss0) / max(abs(loss0), 1e-12)
        grad_diff = float((grad1 - grad0).norm() / grad0.norm().clamp_min(1e-12))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"model {args.layers} x {args.hidden} (vocab {args.vocab}); {args.answers} answers of "
              f"{args.answer_lengths} tokens padded to {args.answer_len}, prompts of {args.prompt_len}, one token "
              f"per round: "
              f"{batch.batch_size} states ({batch.batch_size / args.answers:.1f} per answer), "
              f"{args.answers_per_microbatch} answers per micro-batch")
        for packed in (False, True):
            name = "packed, one row per answer" if packed else "one row per state"
            print(f"  {name:28s} input columns {columns[packed]:6d}  step {med[packed]:.3f} s "
                  f"(median of {args.repeats}: {', '.join(f'{t:.3f}' for t in times[packed])})")
        print(f"  loss {loss0:.6f} vs {loss1:.6f}; gradient relative difference {grad_diff:.2e}; one row per state "
              f"at the padded width (the student step before packing and per-micro-batch trimming): "
              f"{batch.batch_size * (args.prompt_len + 2 * args.answer_len)} input columns")
        print(f"packed_states tokens_ratio={columns[False] / columns[True]:.2f} "
              f"step_speedup={med[False] / med[True]:.2f} loss_rel_diff={loss_diff:.1e} grad_rel_diff={grad_diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
