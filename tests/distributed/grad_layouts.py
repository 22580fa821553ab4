"""Gradients of ``student_step`` at several parallel layouts against a dense float64 reference.

Shared by tests/test_normalization.py (which computes the reference in-process and launches this
file under torchrun with 2 ranks). Each layout builds the student and teacher from checkpoints,
runs one ``student_step`` on its share of a fixed global batch through megatron DDP, then one step
of megatron's Adam with a huge epsilon (the distributed optimizer supports Adam only): its first
update is ``lr * g / (|g| + eps)``, so ``(w_before - w_after) * eps / lr`` is the gradient the
optimizer used (after data-parallel reduction) to a relative error of ``|g| / eps``. Each
rank compares its parameter shards with the matching shards of the TP=1 reference gradient (cut
with the conversion's own sharding rules) and the largest relative error is reported.
"""

from __future__ import annotations

import argparse
from typing import Dict

import torch
import torch.nn.functional as F

from opdlm_megatron.model import masks
from opdlm_megatron.model.losses import DivergenceConfig
from opdlm_megatron.objectives import StateContext, get_objective
from opdlm_megatron.objectives.base import SupervisedBatch
from tests.distributed.student_data import EOS, synthetic_rollout
from tests.helpers import reference_forward

ADAM_EPS = 1.0e6
ADAM_LR = 1.0e10
KINDS = ("opd", "mdlm", "ar", "lift", "opd_tcs")
TCS_CANDIDATES = 4
LAYOUTS = {"dp2": (1, 1, "off"), "dp2_distopt": (1, 1, "on"), "tp2": (2, 1, "off"), "pp2": (1, 2, "off")}


def global_batch(config, kind: str, rows: int = 4) -> SupervisedBatch:
    """A fixed global batch of ``rows`` rows for objective ``kind``."""
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=rows, seed=21)
    ctx = StateContext(mask_token_id=config.mask_token_id, block_size=config.block_size, end_of_turn_ids=[EOS],
                       micro_batch_size=2, score_student=fixed_scores)
    return objective(kind).build(result, torch.Generator().manual_seed(5), ctx)


def objective(kind: str):
    """The objective ``kind``; TCS with K = TCS_CANDIDATES and every position routed (the stand-in
    student's argmax 0 disagrees with the teacher's), so each weight is 1."""
    from opdlm_megatron.objectives.tcs import TCSConfig

    obj = get_objective(kind)
    if kind == "opd_tcs":
        obj.settings = TCSConfig(weight=1.0, candidates=TCS_CANDIDATES, route_prob=0.1)
    return obj


def refined_targets(kind: str, batch: SupervisedBatch, teacher, targets, micro_batch_size: int):
    from opdlm_megatron.objectives import TargetTools

    tools = TargetTools(teacher, fixed_scores, teacher.config.block_size, micro_batch_size)
    return objective(kind).refine_targets(batch, targets, tools)[0]


def reference_q_hat(teacher, config, ids, plen: int, i: int, end: int, log_p):
    """TCS's q_hat (log, over the real tokens) of answer position i from float64 forwards, one per
    candidate; ``ids`` is the row's [prompt; answer] without padding, ``log_p`` the teacher's
    log-probabilities at i."""
    candidates = log_p.topk(TCS_CANDIDATES).indices  # indices among the real ids
    scores = []
    for v in candidates.tolist():
        real = ~config.unused_token_mask(0, config.padded_vocab_size(1))
        token = int(real.nonzero().flatten()[v])
        seq = torch.tensor([ids[:plen + i] + [token] + ids[plen + i + 1:plen + end]])
        layout = masks.causal_layout(torch.ones_like(seq, dtype=torch.bool))
        with torch.no_grad():
            logits = reference_forward(teacher, config, seq, layout.allowed(), layout.position_ids)[0]
        lp = F.log_softmax(logits[:, real], -1)
        real_ids = torch.cumsum(real.long(), 0) - 1  # a token's index among the real ids
        score = float(log_p[v])
        for j in range(i + 1, end):
            score += float(lp[plen + j - 1, real_ids[ids[plen + j]]])
        scores.append(score)
    log_mass = torch.logsumexp(log_p[candidates], 0)
    out = log_p.clone()
    out[candidates] = log_mass + torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)
    return out


def fixed_scores(answers, xt, positions, split_data_parallel=False):
    """A stand-in for the student's scores (LIFT): a fixed function of token and position, so the
    batch is the same at every layout (the real scorer is checked in tests/test_lift.py)."""
    from opdlm_megatron.objectives.scoring import StudentScores

    index = torch.arange(answers.answer_ids.shape[1])[None]
    log_prob = -((answers.answer_ids * 13 + index * 7) % 11).float()
    return StudentScores(torch.where(positions, log_prob, 0.0), torch.zeros_like(answers.answer_ids))


def reference(student_state: Dict[str, torch.Tensor], teacher_state: Dict[str, torch.Tensor], config,
              batch: SupervisedBatch, kind: str = ""):
    """Dense float64 loss (sum over supervised tokens of weight x per-token loss / normalizer tokens)
    and its gradient w.r.t. the student's TP=1 parameters."""
    params = {k: v.double().clone().requires_grad_(True) for k, v in student_state.items()}
    teacher = {k: v.double() for k, v in teacher_state.items()}
    r = batch.answers
    plen, alen = r.prompt_ids.shape[1], r.answer_ids.shape[1]
    if batch.layout == "opd":
        opd = masks.opd_training_batch(r.prompt_ids, r.prompt_valid, r.answer_ids, batch.xt, r.answer_valid,
                                       config.block_size, config.logit_shift)
        logits = reference_forward(params, config, opd.input_ids, opd.layout.allowed(), opd.position_ids)
        columns = opd.prediction_columns
    else:
        ids = torch.cat([r.prompt_ids, r.answer_ids], 1)
        layout = masks.causal_layout(torch.cat([r.prompt_valid, r.answer_valid], 1))
        logits = reference_forward(params, config, ids, layout.allowed(), layout.position_ids)
        columns = plen - 1 + torch.arange(alen)[None].expand(r.batch_size, -1)
    real = ~config.unused_token_mask(0, logits.shape[-1])
    teacher_logits = None
    if batch.distill:
        ids = torch.cat([r.prompt_ids, r.answer_ids], 1)
        layout = masks.causal_layout(torch.cat([r.prompt_valid, r.answer_valid], 1))
        with torch.no_grad():
            teacher_logits = reference_forward(teacher, config, ids, layout.allowed(), layout.position_ids)
    total = torch.zeros((), dtype=torch.float64)
    for b, i in batch.supervised.nonzero().tolist():
        log_q = F.log_softmax(logits[b, columns[b, i], real], -1)
        if batch.distill:
            log_p = F.log_softmax(teacher_logits[b, plen + i - 1, real], -1)
            if kind == "opd_tcs":
                row = torch.cat([r.prompt_ids[b][r.prompt_valid[b]], r.answer_ids[b][r.answer_valid[b]]]).tolist()
                length = int(r.answer_valid[b].sum())
                end = min((i // config.block_size + 1) * config.block_size, length)
                log_p = reference_q_hat(teacher, config, row, int(r.prompt_valid[b].sum()), i, end, log_p)
            term = (log_p.exp() * (log_p - log_q)).sum()
        else:
            target = int(real[: int(r.answer_ids[b, i])].sum())  # the token's index among the real ids
            term = -log_q[target]
        weight = 1.0 if batch.weights is None else float(batch.weights[b, i])
        total = total + weight * term
    loss = total / float(batch.normalizer.sum())
    loss.backward()
    return float(loss), {k: v.grad.float() for k, v in params.items() if v.grad is not None}


def expected_shard(config, local_name: str, to_global, full_grads: Dict[str, torch.Tensor], tp_rank: int, tp: int):
    """This TP rank's shard of the reference gradient of a local parameter (conversion sharding rules)."""
    from opdlm_megatron.tools.hf_mapping import hf_tensors, mapping_for, megatron_shard

    mapping = mapping_for(config, to_global(local_name))
    source = "embedding.word_embeddings.weight" if mapping.layout == "vocab" else mapping.megatron
    padded = config.padded_vocab_size(tp)
    hf = hf_tensors(config, mapping, full_grads[source], padded)

    def read(name, dim, start, end):
        tensor = hf[name]
        return tensor if start is None else tensor.narrow(dim, start, end - start)

    return megatron_shard(config, mapping, read, tp_rank, tp, padded, padded)


def run_layout(name: str, args) -> Dict[str, float]:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from opdlm_megatron.runtime.distributed import data_parallel_share
    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.student import student_step
    from opdlm_megatron.distill.teacher import FrozenTeacher
    from opdlm_megatron.tools.hf_mapping import layer_offset_names

    tp, pp, distopt = LAYOUTS[name]
    reference_grads = torch.load(args.reference, weights_only=True)
    out = {}
    with initialize_runtime(tp, pp, device="cpu", seed=3):
        for kind in KINDS:
            student, config = build_from_checkpoint(args.student, "student")
            teacher_model, teacher_config = build_from_checkpoint(args.teacher, "teacher")
            teacher = FrozenTeacher(teacher_model, teacher_config, config)
            ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=distopt == "on"), student)
            student.config.finalize_model_grads_func = finalize_model_grads
            optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=ADAM_LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=0.0,
                use_distributed_optimizer=distopt == "on", params_dtype=torch.float32), [ddp])
            full = global_batch(config, kind)
            start, end = data_parallel_share(full.batch_size)
            batch = full.rows(torch.arange(start, end))
            targets = None
            if batch.distill:
                r = batch.answers
                targets = teacher.targets(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid,
                                          batch.supervised, micro_batch_size=1)
                targets = refined_targets(kind, batch, teacher, targets, micro_batch_size=1)
            before = {n: p.detach().clone() for n, p in student.named_parameters()}
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            metrics = student_step(ddp, config, batch, targets, DivergenceConfig(chunk_tokens=7), micro_batch_size=1)
            optimizer.step()
            to_global = layer_offset_names(student)
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            worst = torch.zeros(1, dtype=torch.float64)
            for pname, param in student.named_parameters():
                got = (before[pname] - param.detach()) * (ADAM_EPS / ADAM_LR)
                want = expected_shard(config, pname, to_global, reference_grads[kind], tp_rank, tp)
                err = (got - want).abs().max() / want.abs().max().clamp_min(1e-8)
                worst = torch.maximum(worst, err.double()[None])
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            out[kind] = {"loss": metrics["loss"], "max_rel_grad_err": float(worst), "num_tokens": metrics["num_tokens"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group(backend="gloo")
    results = {name: run_layout(name, args) for name in LAYOUTS}
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
