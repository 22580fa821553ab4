"""Shared by tests/test_trainer*.py and the torchrun scripts: a naive reference rollout, replayed
rollouts, and tiny training configs."""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from opdlm_megatron.model import masks
from opdlm_megatron.model.build import attention_mask, mask_unused_vocab
from opdlm_megatron.rollout.types import RolloutResult
from opdlm_megatron.training.config_files import train_config_from_dict

TINY_MODEL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=250, max_sequence_length=128, eos_token_ids=[2], block_size=4,
)


def naive_rollout(model, config, prompts: List[List[int]], decode) -> RolloutResult:
    """Reference block-diffusion decoder (TP=PP=1): recomputes the whole sequence every round with
    the dense block-causal mask, commits in the current block every masked slot whose greedy
    probability is >= threshold (at least the most confident one), stops after the block holding
    EOS. Independent of the rollout engine."""
    b = decode.block_size or config.block_size
    eos = set(decode.eos_token_ids if decode.eos_token_ids is not None else config.eos_token_ids)
    mask_id = config.mask_token_id
    rows = []
    total_forwards = 0
    for prompt in prompts:
        answer: List[int] = []
        commit: List[int] = []
        rnd = 0
        done = False
        while not done and len(answer) < decode.max_new_tokens:
            width = min(b, decode.max_new_tokens - len(answer))
            block = [mask_id] * width
            block_commit = [-1] * width
            while mask_id in block:
                ids = torch.tensor([prompt + answer + block])
                valid = torch.ones_like(ids, dtype=torch.bool)
                layout = masks.block_causal_layout(valid, b, torch.tensor([len(prompt)]))
                logits = model(ids, layout.position_ids, attention_mask(config, layout))
                total_forwards += 1
                logits = mask_unused_vocab(logits.float(), config)[0]
                start = len(prompt) + len(answer)
                cols = [start + i - (1 if config.logit_shift else 0) for i in range(width)]
                probs = torch.softmax(logits[cols], -1)
                conf, tok = probs.max(-1)
                masked = torch.tensor([t == mask_id for t in block])
                conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
                chosen = (conf >= decode.threshold) & masked
                chosen[int(conf.argmax())] = True
                for i in torch.nonzero(chosen).flatten().tolist():
                    block[i] = int(tok[i])
                    block_commit[i] = rnd
                rnd += 1
                # stop once an EOS is committed with every slot before it committed
                eos_at = [i for i, t in enumerate(block) if t in eos]
                if eos_at and mask_id not in block[:eos_at[0]]:
                    block, block_commit = block[:eos_at[0] + 1], block_commit[:eos_at[0] + 1]
                    break
            answer += block
            commit += block_commit
            if any(t in eos for t in block):
                cut = next(i for i, t in enumerate(answer) if t in eos) + 1
                answer, commit = answer[:cut], commit[:cut]
                done = True
        rows.append((prompt, answer, commit, rnd, done))
    return pack_result(rows, total_forwards)


def pack_result(rows, forwards: int) -> RolloutResult:
    bsz = len(rows)
    plen = max(len(r[0]) for r in rows)
    alen = max(len(r[1]) for r in rows)
    out = dict(
        prompt_ids=torch.zeros(bsz, plen, dtype=torch.long), prompt_valid=torch.zeros(bsz, plen, dtype=torch.bool),
        answer_ids=torch.zeros(bsz, alen, dtype=torch.long), answer_valid=torch.zeros(bsz, alen, dtype=torch.bool),
        commit_step=torch.full((bsz, alen), -1, dtype=torch.long),
    )
    for i, (prompt, answer, commit, _, _) in enumerate(rows):
        out["prompt_ids"][i, plen - len(prompt):] = torch.tensor(prompt)
        out["prompt_valid"][i, plen - len(prompt):] = True
        out["answer_ids"][i, :len(answer)] = torch.tensor(answer)
        out["answer_valid"][i, :len(answer)] = True
        out["commit_step"][i, :len(answer)] = torch.tensor(commit)
    return RolloutResult(**out, num_rounds=torch.tensor([r[3] for r in rows]),
                         finished=torch.tensor([r[4] for r in rows]), num_forward_passes=forwards)


class RecordingRollout:
    """Wraps a rollout function and keeps every result (to replay them at another layout)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.results: List[RolloutResult] = []

    def __call__(self, model, config, prompts, decode):
        result = self.fn(model, config, prompts, decode)
        self.results.append(result)
        return result


class ReplayRollout:
    """Returns recorded results in order (checks the prompts match); a data-parallel rank that asks for its
    share of a recorded rollout's prompts (``decode.row_offset`` on) gets those rows."""

    def __init__(self, results: List[RolloutResult]) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self, model, config, prompts, decode):
        if torch.distributed.is_initialized():
            # a real rollout is collective (TP/PP forwards); without that lockstep one rank could run ahead
            # and write files (the teacher-answer cache) before another has read them
            torch.distributed.barrier()
        result = self.results[self.calls]
        self.calls += 1
        got = [row[v].tolist() for row, v in zip(result.prompt_ids, result.prompt_valid)]
        if len(prompts) < len(got):  # this data-parallel rank's share
            start = decode.row_offset
            got = got[start:start + len(prompts)]
            result = result.rows(torch.arange(start, start + len(prompts)))
        assert got == prompts, f"replayed rollout is for other prompts: call {self.calls}, {got} vs {prompts}"
        return result


def write_token_prompts(path: str, num: int = 6, seed: int = 0, vocab: int = 250) -> str:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(num):
            n = 3 + i % 4
            prompt = torch.randint(3, vocab, (n,), generator=g).tolist()
            response = torch.randint(3, vocab, (6 + i % 3,), generator=g).tolist() + [2]
            f.write(json.dumps({"prompt_ids": prompt, "response_ids": response}) + "\n")
    return path


def tiny_train_dict(run_dir: str, data_path: str, student_ckpt: str, **overrides) -> Dict:
    base = dict(
        objective="opd", seed=11, run_dir=run_dir,
        train=dict(steps=4, global_batch_size=2, micro_batch_size=1),
        model=dict(student_checkpoint=student_ckpt),
        parallel=dict(device="cpu"),
        data=dict(source="token_ids", path=data_path, shuffle=True, seed=5),
        rollout=dict(tasks_per_rollout=2, threshold=0.9, temperature=0.0),
        curriculum=dict(min_length=8, max_length=16, warmup_rollouts=2),
        # one state per answer: the tests that are about state selection set it themselves
        loss=dict(state_selection="trajectory"),
        optim=dict(lr=1e-3, min_lr=1e-4, warmup_steps=1),
        checkpoint=dict(save_every=0, resume=True),
        logging=dict(progress_bar=False),
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def tiny_train_config(*args, **kwargs):
    return train_config_from_dict(tiny_train_dict(*args, **kwargs))


def exists(path: str) -> bool:
    return os.path.exists(path)
