"""Shared by tests/test_{states,teacher,student_step}.py and the torchrun script student_parallel.py:
a synthetic block-diffusion rollout, the teacher/student pair used by the parallel checks, and a
grad norm over the transformer layers that is comparable across TP/PP layouts."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import torch

from opdlm_megatron.rollout.types import RolloutResult
from tests.helpers import tiny_config

EOS = 2


def synthetic_rollout(vocab_size: int, block_size: int = 4, batch_size: int = 3, prompt_len: int = 6,
                      answer_len: int = 10, seed: int = 0, eos_row: int = 1) -> RolloutResult:
    """A rollout as the engine would return it: left-padded prompts of mixed lengths, right-padded
    answers of mixed lengths, and per-block commit rounds (each round of a block commits >= 1 token,
    rounds count up over the whole answer). Row ``eos_row`` has an EOS inside its answer, followed by
    more valid tokens (to exercise the after-end-of-turn mask)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab_size, (batch_size, prompt_len), generator=g)
    answer_ids = torch.randint(3, vocab_size, (batch_size, answer_len), generator=g)
    prompt_lengths = [prompt_len] + [int(x) for x in torch.randint(1, prompt_len + 1, (batch_size - 1,), generator=g)]
    answer_lengths = [answer_len] + [int(x) for x in torch.randint(answer_len // 2, answer_len + 1, (batch_size - 1,), generator=g)]
    prompt_valid = torch.zeros(batch_size, prompt_len, dtype=torch.bool)
    answer_valid = torch.zeros(batch_size, answer_len, dtype=torch.bool)
    commit = torch.full((batch_size, answer_len), -1, dtype=torch.long)
    num_rounds = torch.zeros(batch_size, dtype=torch.long)
    for b in range(batch_size):
        prompt_valid[b, prompt_len - prompt_lengths[b]:] = True
        answer_valid[b, :answer_lengths[b]] = True
        round_ = 0
        for start in range(0, answer_lengths[b], block_size):
            n = min(block_size, answer_lengths[b] - start)
            rounds = int(torch.randint(1, n + 1, (1,), generator=g))
            # every round commits at least one token: a shuffled assignment covering all rounds
            per_token = torch.cat([torch.arange(rounds), torch.randint(0, rounds, (n - rounds,), generator=g)])
            per_token = per_token[torch.randperm(n, generator=g)]
            commit[b, start:start + n] = round_ + per_token
            round_ += rounds
        num_rounds[b] = round_
    if 0 <= eos_row < batch_size and answer_lengths[eos_row] > 3:
        answer_ids[eos_row, answer_lengths[eos_row] // 2] = EOS
    answer_ids[~answer_valid] = 0
    prompt_ids[~prompt_valid] = 0
    return RolloutResult(prompt_ids, prompt_valid, answer_ids, answer_valid, commit, num_rounds,
                         torch.ones(batch_size, dtype=torch.bool), int(num_rounds.max()) * batch_size)


def authors_rounds(x0, valid, commit, block, keep, mask_id):
    """Every round of every block as the authors' ``one_round_vectorized`` loop builds them, token by
    token: each round takes, per block, the smallest commit round not yet taken; the tokens at or after
    it are masked; the round's values are then removed. Rows without a masked ``keep`` token are dropped
    (an answer with none keeps its first row)."""
    length = len(x0)
    remaining = [int(commit[i]) if bool(valid[i]) else None for i in range(length)]
    rows = []
    while True:
        state, any_taken = [], False
        minima = {}
        for start in range(0, length, block):
            values = [v for v in remaining[start:start + block] if v is not None]
            if values:
                minima[start] = min(values)
        if not minima:
            break
        for i in range(length):
            start = i - i % block
            masked = remaining[i] is not None and remaining[i] >= minima[start]
            state.append(mask_id if masked or not bool(valid[i]) else int(x0[i]))  # padding holds the mask id, as elsewhere
        for i in range(length):
            start = i - i % block
            if remaining[i] is not None and remaining[i] == minima[start]:
                remaining[i] = None
                any_taken = True
        assert any_taken
        rows.append(state)
    useful = [r for r in rows if any(r[i] == mask_id and bool(keep[i]) for i in range(length))]
    if not useful:
        useful = rows[:1]
    return useful


def student_config(**overrides):
    return tiny_config(eos_token_ids=[EOS], **overrides)


def teacher_config():
    """A larger teacher (more layers, wider) with the student's vocabulary."""
    return tiny_config(eos_token_ids=[EOS], num_layers=6, hidden_size=96, ffn_hidden_size=192)


def layer_grad_norm(model) -> float:
    """L2 norm of the transformer layers' gradients over the model-parallel group (TP-replicated
    parameters counted once). Embedding/output weights are left out: with PP and tied embeddings
    they live on two stages and are only synchronised by the optimizer's grad finalisation."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        grad = getattr(p, "main_grad", None) if p.grad is None else p.grad
        if ".layers." in name and grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += grad.double().pow(2).sum()
    torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return float(sq.sqrt())


# (name, objective, divergence kwargs, state selection) of the student-step cases checked at TP=1,
# TP=2 and PP=2
CASES = [
    ("forward_kl-block", "distill", dict(kind="forward_kl"), "block"),
    ("jsd-top5-trajectory", "distill", dict(kind="jsd", jsd_beta=0.3, top_k=5, renormalize_top_k=False), "trajectory"),
    ("reverse_kl-top5-from-teacher-topk", "distill", dict(kind="reverse_kl", top_k=5), "block"),
    ("mdlm-ce", "ce", None, "forward_mask"),
]
TEACHER_TOP_K = 8


def run_cases(student, config, teacher, micro_batch_size: int = 2) -> dict:
    """Teacher logits (this rank's shard, last stage) and, per case, the student step's loss, token
    count and layer grad norm. Same data on every rank (fixed seeds)."""
    from opdlm_megatron.model.losses import DivergenceConfig
    from opdlm_megatron.distill.states import forward_mask, select_states
    from tests.helpers import student_forward_backward

    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, seed=5)
    logits = teacher.answer_logits(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid,
                                   micro_batch_size)
    top = teacher.answer_logits(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid,
                                micro_batch_size, top_k=TEACHER_TOP_K)
    out = {"teacher_logits": logits, "teacher_top_k": top,
           "teacher_nll": teacher.answer_nll(result.prompt_ids, result.prompt_valid, result.answer_ids,
                                             result.answer_valid, micro_batch_size, logits=top)}
    for name, objective, div_kwargs, selection in CASES:
        g = torch.Generator().manual_seed(17)
        weights = None
        if selection == "forward_mask":
            xt, t = forward_mask(result.answer_ids, result.answer_valid, config.block_size, g, config.mask_token_id)
            weights = 1.0 / t
        else:
            xt = select_states(result, selection, g, config.mask_token_id, block_size=config.block_size)
        targets = result.answer_ids if objective == "ce" else top if "teacher-topk" in name else logits
        cfg = DivergenceConfig(chunk_tokens=7, **div_kwargs) if div_kwargs else None
        student.zero_grad(set_to_none=True)
        step = student_forward_backward(student, config, result, xt, targets, objective, cfg, micro_batch_size,
                                        loss_weights=weights)
        out[name] = dict(step, grad_norm=layer_grad_norm(student))
    return out


@functools.lru_cache(maxsize=None)
def parallel_check_results():
    """One torchrun launch shared by test_losses.py and test_student_step.py (each launch costs ~10 s).

    Builds the TP=1 student and (larger) teacher, saves their checkpoints, computes the TP=1
    reference with ``run_cases``, then runs tests/distributed/student_parallel.py at TP=2 and PP=2
    (plus the TP=2 loss checks). Returns (reference, {"tp2": ..., "pp2": ...}, loss_errors).
    """
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.distill.teacher import FrozenTeacher
    from tests.conftest import load_json, run_torchrun

    workdir = tempfile.mkdtemp(prefix="opdlm-student-parallel-")
    atexit.register(shutil.rmtree, workdir, True)
    student_ckpt, teacher_ckpt = os.path.join(workdir, "student"), os.path.join(workdir, "teacher")
    with initialize_runtime(device="cpu", seed=11):
        config = student_config()
        student = build_model(config, "student")
        save_model_checkpoint(student, student_ckpt, config)
        save_model_checkpoint(build_model(teacher_config(), "student"), teacher_ckpt, teacher_config())
        reference = run_cases(student, config, FrozenTeacher.from_checkpoint(teacher_ckpt, config))
    out, losses_out = os.path.join(workdir, "out.pt"), os.path.join(workdir, "losses.json")
    run_torchrun("student_parallel.py", f"--student-ckpt={student_ckpt}", f"--teacher-ckpt={teacher_ckpt}",
                 f"--losses-out={losses_out}", f"--out={out}")
    return reference, torch.load(out, weights_only=False), load_json(losses_out)
