"""Where is SmolLM2-135M-Instruct sure of its own answers? The ceiling of a student's parallel decoding.

    python benchmarks/teacher_confidence.py [--prompts 100] [--families a,b,...] [--quick]

A student trained by forward KL to its teacher commits a slot at threshold tau only where it is tau
sure, and it cannot be surer than the teacher's distribution it matches; two slots of one block at
once need two consecutive sure tokens. For each candidate prompt family (reasoning-gym datasets with
short deterministic answers, and the families of ``opdlm_megatron/data/families.py``) the teacher answers
held-out prompts greedily (AR, chat template, one system prompt for all), each family's own scorer
grades them, and the teacher's probability of each of its greedy tokens (teacher-forced NLL of the
answer: the same context it decoded with) gives the share of tokens with p >= 0.9 and >= 0.7 and of
consecutive token pairs both >= 0.9 (end-of-turn token included).

``--student LABEL=CKPT`` (repeatable) measures where a block-diffusion student stands against that
ceiling: on the teacher's answers, every block's first round (the block all [MASK], the earlier blocks
the teacher's tokens: what the student sees when it has so far decoded what the teacher would), the
share of tokens the student is >= 0.9 sure of (per slot of the block, too), how many of those it would
commit right (its choice is the teacher's token), and the tokens the round would commit at the
threshold (at least one, at most the block's). All blocks' first rounds come from one forward of the
training layout ``[prompt | x0 | xt]`` with every answer token masked in xt.

Writes ``benchmarks/results/teacher_confidence.json``; the last line names the families where the
teacher is accurate (>= 0.6) and confident (>= 0.5 of its tokens at p >= 0.9):
``families=N accurate_and_confident=F1,F2,...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SYSTEM_PROMPT = "Give only the final answer, with no explanation."
# reasoning-gym datasets with short deterministic answers (options keep them small for a 135M model)
GYM = [
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("gcd", {}), ("lcm", {}), ("count_bits", {}), ("letter_counting", {}), ("spell_backward", {}),
    ("number_sorting", {}), ("word_sequence_reversal", {}), ("base_conversion", {}), ("leg_counting", {}),
    ("products", {}), ("sentence_reordering", {}), ("decimal_chain_sum", {}),
]
ACCURATE, CONFIDENT = 0.6, 0.5


def confidence(nll, valid):
    """Shares of answer tokens with p >= 0.9 / >= 0.7 and of consecutive pairs both >= 0.9."""
    p = (-nll).exp()
    sure = (p >= 0.9) & valid
    pairs = sure[:, 1:] & sure[:, :-1]
    pair_count = (valid[:, 1:] & valid[:, :-1]).sum()
    tokens = valid.sum()
    return (float(sure.sum() / tokens), float(((p >= 0.7) & valid).sum() / tokens),
            float(pairs.sum() / max(1, int(pair_count))), float(p[valid].mean()))


def per_slot(sure, valid, block_size):
    """Share of ``sure`` among the ``valid`` answer tokens at each slot of a block (answers start a block)."""
    slot = torch.arange(sure.shape[1]) % block_size
    return [float((sure & valid & (slot == s)).sum() / max(1, int((valid & (slot == s)).sum())))
            for s in range(block_size)]


def first_round(model, config, answers, micro_batch_size):
    """The student's top probability ``[B, A]`` and whether its top token is the answer's ``[B, A]`` at
    every answer token in its block's first round: the block all [MASK], earlier blocks the answer's."""
    from opdlm_megatron.model.build import forward_answer_columns, mask_unused_vocab
    from opdlm_megatron.model.masks import opd_training_batch

    ids, valid = answers.answer_ids, answers.answer_valid
    xt = torch.where(valid, torch.full_like(ids, config.mask_token_id), ids)
    batch = opd_training_batch(answers.prompt_ids, answers.prompt_valid, ids, xt, valid, config.block_size,
                               config.logit_shift)
    top, right = torch.zeros(ids.shape), torch.zeros(ids.shape, dtype=torch.bool)

    def consume(rows, answer_index, slot_valid, logits):
        p, choice = mask_unused_vocab(logits.float(), config).softmax(-1).max(-1)
        r, i = rows[:, None].expand_as(answer_index)[slot_valid], answer_index[slot_valid]
        top[r, i] = p[slot_valid].cpu()
        right[r, i] = choice[slot_valid].cpu() == ids[r, i]

    with torch.no_grad():
        forward_answer_columns(model, config, batch.input_ids, batch.layout, batch.prediction_columns, valid,
                               micro_batch_size, consume)
    return top, right


def first_round_summary(top, right, valid, block_size, threshold=0.9):
    """What the first rounds say: shares of sure tokens (all, per slot), of sure tokens that are right,
    and the tokens a round commits at ``threshold`` (>= 1, <= the block's tokens), averaged over blocks."""
    sure = (top >= threshold) & valid
    bsz, length = valid.shape
    blocks = -(-length // block_size)
    pad = blocks * block_size - length
    sure_b = torch.nn.functional.pad(sure, (0, pad)).view(bsz, blocks, block_size).sum(-1)
    real_b = torch.nn.functional.pad(valid, (0, pad)).view(bsz, blocks, block_size).sum(-1)
    has = real_b > 0
    commits = torch.minimum(sure_b.clamp_min(1), real_b)[has].double()
    return {"p_ge_0.9": float(sure.sum() / valid.sum()), "per_slot_p_ge_0.9": per_slot(sure, valid, block_size),
            # None where the student is sure of nothing
            "sure_and_right": float((sure & right).sum() / sure.sum()) if bool(sure.any()) else None,
            "commits_per_round": float(commits.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--families", default=None, help="comma-separated names (default: every candidate)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    p.add_argument("--shots", type=int, default=0,
                   help="solved examples before each question of the opdlm/ families (their option 'shots'); the "
                        "table goes to teacher_confidence_shotsK.json")
    p.add_argument("--checkpoint", default=None,
                   help="the teacher: a converted checkpoint (default: SmolLM2-135M-Instruct converted in the cache)")
    p.add_argument("--student", action="append", default=[], metavar="LABEL=CKPT",
                   help="a block-diffusion student to measure on the teacher's answers (repeatable)")
    p.add_argument("--quick", action="store_true", help="two families, 4 prompts, a tiny random model")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "teacher_confidence.json"))
    args = p.parse_args()

    from opdlm_megatron.distill.answers import results_from_answers
    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.data.samples import load_tokenizer
    from opdlm_megatron.eval.metrics import summarize_run
    from opdlm_megatron.eval.runner import ar_config, generate, score_generations, teacher_decode
    from opdlm_megatron.eval.tasks import TaskSpec, load_task
    from opdlm_megatron.eval.evaluation import encode
    from opdlm_megatron.data.families import family_names
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.rollout.config import DecodeConfig
    from opdlm_megatron.distill.teacher import FrozenTeacher

    students = []
    for spec in args.student:
        label, _, path = spec.partition("=")
        if not label or not path or not os.path.isdir(path):
            raise ValueError(f"--student wants LABEL=CKPT with an existing checkpoint directory, got {spec!r}")
        students.append((label, path))
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint must be an existing checkpoint directory, got {args.checkpoint!r}")
    shots = {"shots": args.shots} if args.shots else {}
    candidates = [(name, options) for name, options in GYM] + [(name, dict(shots)) for name in family_names()]
    if args.families:
        wanted = args.families.split(",")
        candidates = [c for c in candidates if c[0] in wanted] + [(n, {}) for n in wanted
                                                                   if n not in {c[0] for c in candidates}]
    if args.shots:
        args.out = args.out.replace(".json", f"_shots{args.shots}.json")
    if args.quick:
        import tempfile

        from tests.helpers import save_tiny_student

        ckpt = save_tiny_student(os.path.join(tempfile.mkdtemp(prefix="confidence_"), "ckpt"), seed=3,
                                 max_sequence_length=256)
        candidates, args.prompts, args.max_new_tokens = candidates[:1] + [("opdlm/copy_sentence", {})], 4, 8
        args.out = os.path.join(os.path.dirname(ckpt), "teacher_confidence.json")
        students = students or [("tiny", ckpt)]
    elif args.checkpoint:
        ckpt = args.checkpoint
    else:
        from opdlm_megatron.tools.convert_hf_to_megatron import ensure_converted_smollm2

        ckpt = ensure_converted_smollm2(block_size=4)
    tokenizer = load_tokenizer(os.path.join(ckpt, "tokenizer"))
    rows = []
    with initialize_runtime(device="cpu", seed=0):
        model, config = build_from_checkpoint(ckpt, "teacher")
        teacher = FrozenTeacher(model, config, config)
        student_models = [(label, *build_from_checkpoint(path, "student")) for label, path in students]
        for label, _, student_config in student_models:
            if student_config.num_tokens != config.num_tokens:
                raise ValueError(f"--student {label} has {student_config.num_tokens} tokens, the teacher "
                                 f"{config.num_tokens}: they must share a tokenizer")
        decode = teacher_decode(DecodeConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=config.eos_token_ids))
        for task, options in candidates:
            began = time.time()
            items = load_task(TaskSpec(task, options=options, num_samples=args.prompts, seed=999))
            prompts = encode(items, tokenizer, True, args.system_prompt)
            gens = generate(model, ar_config(config), prompts, decode, args.batch_size)
            result = summarize_run(score_generations(items, gens, tokenizer, "teacher", "ar", 0))
            answers = results_from_answers(prompts, [g.ids for g in gens], [g.finished for g in gens],
                                           config.pad_token_id or 0)
            nll = teacher.answer_nll(answers.prompt_ids, answers.prompt_valid, answers.answer_ids, answers.answer_valid,
                                     args.batch_size)
            p90, p70, pairs90, mean_p = confidence(nll, answers.answer_valid)
            row = {"family": task, "options": options, "accuracy": result["accuracy"],
                   "accuracy_se": result["accuracy_se"], "answer_tokens": result["mean_answer_tokens"],
                   "hit_length_limit": result["hit_length_limit"], "p_ge_0.9": p90, "p_ge_0.7": p70,
                   "pairs_ge_0.9": pairs90, "mean_p": mean_p, "seconds": round(time.time() - began, 1),
                   "example": {"question": items[0].question, "reference": items[0].reference,
                               "answer": tokenizer.decode(gens[0].ids, skip_special_tokens=True)}}
            rows.append(row)
            print(f"{task:28s} acc {row['accuracy']:.3f} ±{row['accuracy_se']:.3f} len {row['answer_tokens']:5.1f} "
                  f"p>=0.9 {p90:.3f} p>=0.7 {p70:.3f} pairs>=0.9 {pairs90:.3f} ({row['seconds']:.0f} s)", flush=True)
            if student_models:
                valid = answers.answer_valid
                row["teacher_per_slot_p_ge_0.9"] = per_slot((-nll).exp() >= 0.9, valid, student_models[0][2].block_size)
                row["students"] = {}
                for label, student, student_config in student_models:
                    top, right = first_round(student, student_config, answers, args.batch_size)
                    got = first_round_summary(top, right, valid, student_config.block_size)
                    row["students"][label] = got
                    print(f"{'':28s} {label}: first rounds p>=0.9 {got['p_ge_0.9']:.3f} (per slot "
                          + " ".join(f"{x:.2f}" for x in got["per_slot_p_ge_0.9"])
                          + "), sure and right " + ("n/a" if got["sure_and_right"] is None else
                                                   f"{got['sure_and_right']:.3f}") + ", "
                          f"commits per round {got['commits_per_round']:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"system_prompt": args.system_prompt, "prompts": args.prompts, "shots": args.shots,
                   "teacher": ckpt, "students": dict(students), "rows": rows},
                  f, indent=1)
    good = [r["family"] for r in rows if r["accuracy"] >= ACCURATE and r["p_ge_0.9"] >= CONFIDENT]
    print(f"table: {args.out}")
    print(f"families={len(rows)} accurate_and_confident={','.join(good) if good else 'none'}")


if __name__ == "__main__":
    from opdlm_megatron.commands.base import refuse_bad_input

    refuse_bad_input("teacher_confidence", main)  # bad input: one line, exit code 2, nothing written
