"""student_forward_backward against a loss computed by hand (model run directly on the OPD layout,
columns picked token by token, divergence dense with torch.nn.functional), and TP=2 / PP=2 against
TP=1 (loss and grad norm, plus the teacher's answer logits) in one torchrun launch."""

import math

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron.model.losses import DivergenceConfig
from opdlm_megatron.model.masks import opd_training_batch
from opdlm_megatron.model.build import attention_mask, build_model
from opdlm_megatron.distill.states import forward_mask, select_states
from tests.helpers import student_forward_backward
from tests.distributed.student_data import CASES, EOS, student_config, synthetic_rollout


def hand_column(i, plen, alen, block, shift):
    """Column of the [prompt | x0 | xt] sequence whose output predicts answer token i."""
    if not shift:
        return plen + alen + i
    if i % block:  # inside a block: the previous xt token
        return plen + alen + i - 1
    return plen - 1 if i == 0 else plen + i - 1  # block start: the previous clean token


def hand_loss(model, config, result, xt, teacher_logits=None, weights=None):
    """Paper normalisation with dense torch: per row, sum over supervised tokens / count, then the
    mean over rows with a supervised token (with 1/t weights: / the row's kept answer tokens)."""
    batch = opd_training_batch(result.prompt_ids, result.prompt_valid, result.answer_ids, xt, result.answer_valid,
                               config.block_size, config.logit_shift)
    logits = model(batch.input_ids, batch.position_ids, attention_mask(config, batch.layout))
    real = torch.arange(logits.shape[-1]) < config.model_vocab_size
    real[config.mask_token_id] = False
    plen, alen = result.prompt_ids.shape[1], result.answer_ids.shape[1]
    row_losses = []
    for b in range(result.batch_size):
        terms, kept = [], 0
        for i in range(alen):
            if not result.answer_valid[b, i]:
                break
            kept += 1
            if xt[b, i] == config.mask_token_id:
                student = F.log_softmax(logits[b, hand_column(i, plen, alen, config.block_size, config.logit_shift), real], -1)
                if teacher_logits is not None:
                    teacher = F.log_softmax(teacher_logits[b, i, real].double(), -1).float()
                    terms.append(F.kl_div(student, teacher, reduction="sum", log_target=True))
                else:
                    target = int(result.answer_ids[b, i])
                    terms.append(-student[target] * weights[b, i])
            if result.answer_ids[b, i] == EOS:  # nothing after the first end-of-turn token
                break
        if terms:
            row_losses.append(sum(terms) / (len(terms) if weights is None else kept))
    return sum(row_losses) / len(row_losses)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("logit_shift", [False, True])
def test_distill_step_matches_hand_computed_loss(runtime, logit_shift):
    config = student_config(logit_shift=logit_shift)
    model = build_model(config, "student")
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, seed=7)
    xt = select_states(result, "block", torch.Generator().manual_seed(0), config.mask_token_id,
                       block_size=config.block_size)
    teacher_logits = torch.randn(3, result.answer_ids.shape[1], config.padded_vocab_size(1),
                                 generator=torch.Generator().manual_seed(1)) * 3

    model.zero_grad(set_to_none=True)
    expected = hand_loss(model, config, result, xt, teacher_logits=teacher_logits)
    expected.backward()
    expected_grads = grads(model)

    model.zero_grad(set_to_none=True)
    out = student_forward_backward(model, config, result, xt, teacher_logits, "distill",
                                   DivergenceConfig(chunk_tokens=5), micro_batch_size=2)
    assert math.isclose(out["loss"], float(expected), rel_tol=1e-5, abs_tol=1e-6)
    supervised = (xt == config.mask_token_id) & result.answer_valid
    assert out["num_tokens"] < int(supervised.sum()), "tokens after the row's end-of-turn are not supervised"
    got = grads(model)
    assert got.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name


def test_masked_diffusion_step_matches_hand_computed_loss(runtime):
    config = student_config()
    model = build_model(config, "student")
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, seed=8)
    xt, t = forward_mask(result.answer_ids, result.answer_valid, config.block_size,
                         torch.Generator().manual_seed(3), config.mask_token_id)
    weights = 1.0 / t
    expected = hand_loss(model, config, result, xt, weights=weights)
    out = student_forward_backward(model, config, result, xt, result.answer_ids, "ce", None, micro_batch_size=3,
                                   forward_only=True, loss_weights=weights)
    assert math.isclose(out["loss"], float(expected), rel_tol=1e-5)
    assert all(p.grad is None for p in model.parameters()), "forward_only computes no gradients"


def test_bad_inputs_raise_clear_errors(runtime):
    config = student_config()
    model = build_model(config, "student")
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=2)
    xt = result.answer_ids.clone()
    logits = torch.zeros(2, result.answer_ids.shape[1], config.padded_vocab_size(1))
    with pytest.raises(ValueError, match="unknown objective 'kd'"):
        student_forward_backward(model, config, result, xt, logits, "kd", DivergenceConfig(), 2)
    with pytest.raises(ValueError, match=r"xt \(2, 3\)"):
        student_forward_backward(model, config, result, xt[:, :3], logits, "distill", DivergenceConfig(), 2)
    with pytest.raises(ValueError, match="teacher logits have 200 vocabulary columns per rank, the student 256"):
        student_forward_backward(model, config, result, xt, logits[..., :200], "distill", DivergenceConfig(), 2)
    with pytest.raises(ValueError, match="token-id targets"):
        student_forward_backward(model, config, result, xt, None, "ce", None, 2)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_layouts_match_tp1(layout):
    """Teacher answer logits, and the student step's loss and grad norm for every case, at TP=2 and PP=2."""
    from tests.distributed.student_data import parallel_check_results

    reference, parallel, _ = parallel_check_results()
    got = parallel[layout]
    assert (got["teacher_logits"] - reference["teacher_logits"]).abs().max() < 1e-4
    top, ref_top = got["teacher_top_k"], reference["teacher_top_k"]
    assert torch.equal(top.indices, ref_top.indices)  # top-k over vocabulary shards = top-k over the vocabulary
    assert (top.values - ref_top.values).abs().max() < 1e-4
    assert (top.logsumexp - ref_top.logsumexp).abs().max() < 1e-4
    assert (got["teacher_nll"] - reference["teacher_nll"]).abs().max() < 1e-4
    for name, *_ in CASES:
        exp, res = reference[name], got[name]
        assert res["num_tokens"] == exp["num_tokens"] > 0, name
        assert math.isclose(res["loss"], exp["loss"], rel_tol=1e-5), (name, res["loss"], exp["loss"])
        assert math.isclose(res["grad_norm"], exp["grad_norm"], rel_tol=1e-4), (name, res["grad_norm"], exp["grad_norm"])


def test_gradients_accumulate_into_megatron_ddp_main_grad(runtime):
    """Wrapped in megatron-core DDP, the step fills ``main_grad``: equal to the bare model's grads
    (computed here from a copy of the same weights), and accumulating over two calls."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = student_config()
    bare = build_model(config, "student")
    wrapped_module = build_model(config, "student")
    wrapped_module.load_state_dict(bare.state_dict())
    ddp = DistributedDataParallel(wrapped_module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  wrapped_module)
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, seed=9)
    xt = select_states(result, "trajectory", torch.Generator().manual_seed(0), config.mask_token_id)
    teacher_logits = torch.randn(3, result.answer_ids.shape[1], config.padded_vocab_size(1),
                                 generator=torch.Generator().manual_seed(2))
    args = (result, xt, teacher_logits, "distill", DivergenceConfig(kind="reverse_kl", top_k=9), 2)

    bare.zero_grad(set_to_none=True)
    ref = student_forward_backward(bare, config, *args)
    ddp.zero_grad_buffer()
    got = student_forward_backward(ddp, config, *args)
    assert got == ref
    for (name, p), (_, q) in zip(bare.named_parameters(), wrapped_module.named_parameters()):
        assert torch.allclose(q.main_grad, p.grad, rtol=1e-5, atol=1e-7), name
    student_forward_backward(ddp, config, *args)  # gradients accumulate until zeroed
    for (name, p), (_, q) in zip(bare.named_parameters(), wrapped_module.named_parameters()):
        assert torch.allclose(q.main_grad, 2 * p.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("logit_shift,micro_batch_size", [(False, 1), (True, 2)])
def test_packed_states_match_the_hand_computed_loss_of_each_state_alone(runtime, logit_shift, micro_batch_size):
    """loss.pack_states: every round of every block of answers of mixed lengths (one with an EOS inside,
    blocks of 1-4 rounds, so answers have different numbers of states) forwarded one packed row per
    answer; the loss and gradients are the hand-computed ones of every state run alone on its own
    [prompt | x0 | xt] row (row normalisation), and the same as the unpacked step's."""
    from opdlm_megatron.distill.states import all_round_states
    from opdlm_megatron.distill.teacher import TeacherTargets
    from opdlm_megatron.objectives.base import StateContext, masked_state_batch
    from opdlm_megatron.training.student import StudentStepPlan, student_step

    config = student_config(logit_shift=logit_shift)
    model = build_model(config, "student")
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, prompt_len=7, answer_len=11, seed=5)
    ctx = StateContext(mask_token_id=config.mask_token_id, block_size=config.block_size, end_of_turn_ids=[EOS])
    source, xt = all_round_states(result, config.block_size, config.mask_token_id)
    states = result.rows(source, trim=False)
    batch = masked_state_batch(states, xt, ctx, distill=True, groups=source)
    assert len(set(torch.bincount(source).tolist())) > 1, "answers should have different numbers of states"
    teacher_logits = torch.randn(3, result.answer_ids.shape[1], config.padded_vocab_size(1),
                                 generator=torch.Generator().manual_seed(2)) * 3
    per_state = teacher_logits[source]

    model.zero_grad(set_to_none=True)
    expected = hand_loss(model, config, states, xt, teacher_logits=per_state)
    expected.backward()
    expected_grads = grads(model)

    targets = TeacherTargets.dense(per_state, tuple(xt.shape))
    plan = StudentStepPlan(model, config, batch, targets, DivergenceConfig(chunk_tokens=5), micro_batch_size,
                           "row", pack_states=True)
    assert plan.packed and all(mb["ids"].shape[0] == micro_batch_size for mb in plan.microbatches)
    found = {}
    for pack in (True, False):
        model.zero_grad(set_to_none=True)
        out = student_step(model, config, batch, targets, DivergenceConfig(chunk_tokens=5), micro_batch_size,
                           normalization="row", pack_states=pack)
        found[pack] = grads(model)
        assert math.isclose(out["loss"], float(expected), rel_tol=1e-5, abs_tol=1e-6), pack
    for name, g in expected_grads.items():
        for pack in (True, False):
            assert torch.allclose(found[pack][name], g, rtol=1e-4, atol=1e-6), (name, pack)


def test_packed_states_benchmark_quick():
    """benchmarks/packed_states.py --quick: the fixed last line, fewer input columns packed, the same loss."""
    import re
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "packed_states.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"packed_states tokens_ratio=(\S+) step_speedup=(\S+) loss_rel_diff=(\S+) grad_rel_diff=(\S+)", last)
    assert m, last
    assert float(m.group(1)) > 1.2 and float(m.group(2)) > 0
    assert float(m.group(3)) < 1e-5 and float(m.group(4)) < 1e-4
