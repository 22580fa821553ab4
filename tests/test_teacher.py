"""Frozen teacher: answer logits against a per-row, unpadded causal forward written here; frozen
state, lower precision, a larger teacher, NLL metric, and vocabulary checks. The TP=2/PP=2
comparison runs in tests/test_student_step.py (one torchrun launch for teacher and student)."""

import pytest
import torch

from opdlm_megatron.checkpoint.model import save_model_checkpoint
from opdlm_megatron.model.build import build_model
from opdlm_megatron.distill.teacher import FrozenTeacher, check_vocab_compatible
from opdlm_megatron.model.microbatches import microbatch_rows
from tests.distributed.student_data import student_config, synthetic_rollout, teacher_config


def unpadded_reference(model, result):
    """Per row: the real tokens [prompt; answer] alone, a hand-made causal mask, positions 0..L-1;
    the logits at position plen-1+i predict answer token i. Returns {(row, i): logits [V]}."""
    out = {}
    with torch.no_grad():
        for b in range(result.batch_size):
            prompt = result.prompt_ids[b][result.prompt_valid[b]]
            answer = result.answer_ids[b][result.answer_valid[b]]
            ids = torch.cat([prompt, answer])[None]
            n = ids.shape[1]
            causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]  # True = masked out
            logits = model(ids, torch.arange(n)[None], causal)[0]
            for i in range(answer.numel()):
                out[(b, i)] = logits[len(prompt) - 1 + i]
    return out


@pytest.fixture
def teacher_ckpt(runtime, tmp_path):
    config = teacher_config()
    model = build_model(config, "student")  # as converted from HF: a plain trainable GPTModel
    save_model_checkpoint(model, str(tmp_path / "teacher"), config)
    return tmp_path / "teacher", config


def test_answer_logits_match_unpadded_causal_forward(runtime, teacher_ckpt):
    path, _ = teacher_ckpt
    teacher = FrozenTeacher.from_checkpoint(str(path), student_config())
    result = synthetic_rollout(vocab_size=250, batch_size=3, seed=1)
    logits = teacher.answer_logits(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid,
                                   micro_batch_size=2)  # 3 rows in 2 microbatches: the last one is filled up
    assert logits.shape == (3, result.answer_ids.shape[1], teacher.config.padded_vocab_size(1))
    reference = unpadded_reference(teacher.model, result)
    assert len(reference) == int(result.answer_valid.sum())
    for (b, i), ref in reference.items():
        assert (logits[b, i] - ref).abs().max() < 1e-5, (b, i)

    # teacher NLL of the answers over real tokens ([MASK] and padded rows excluded)
    nll = teacher.answer_nll(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid, 2,
                             logits=logits)
    real = teacher.config.model_vocab_size
    keep = torch.arange(teacher.config.padded_vocab_size(1)) < real
    keep[teacher.config.mask_token_id] = False
    for (b, i), ref in reference.items():
        expected = -torch.log_softmax(ref[keep].double(), -1)[int(result.answer_ids[b, i])]
        assert abs(float(nll[b, i]) - float(expected)) < 1e-5
    assert (nll[~result.answer_valid] == 0).all()

    # top-k mode: the same top-k, normaliser and NLL as from the full logits, microbatch by microbatch
    top = teacher.answer_logits(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid,
                                micro_batch_size=2, top_k=6)
    assert top.values.shape == top.indices.shape == (3, result.answer_ids.shape[1], 6)
    for (b, i), ref in reference.items():
        values, ids = ref[keep].topk(6)
        assert torch.equal(top.indices[b, i], keep.nonzero().squeeze(1)[ids])
        assert (top.values[b, i] - values).abs().max() < 1e-5
        assert abs(float(top.logsumexp[b, i]) - float(torch.logsumexp(ref[keep], -1))) < 1e-5
    assert (top.answer_nll - nll).abs().max() < 1e-5


def test_teacher_is_frozen_and_can_run_in_bf16(runtime, teacher_ckpt):
    path, _ = teacher_ckpt
    fp32 = FrozenTeacher.from_checkpoint(str(path), student_config())
    bf16 = FrozenTeacher.from_checkpoint(str(path), student_config(), dtype=torch.bfloat16)
    for teacher in (fp32, bf16):
        assert not teacher.model.training
        assert not any(p.requires_grad for p in teacher.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    result = synthetic_rollout(vocab_size=250, batch_size=2, seed=2)
    args = (result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid, 2)
    a, b = fp32.answer_logits(*args), bf16.answer_logits(*args)
    assert b.dtype == torch.bfloat16
    valid = result.answer_valid
    assert (a[valid] - b[valid].float()).abs().max() < 0.1  # bf16 rounding only
    assert a.grad_fn is None


def test_vocabulary_mismatch_is_a_clear_error():
    student = student_config()
    with pytest.raises(ValueError, match="vocab_size 300 != student vocab_size 250"):
        check_vocab_compatible(student.replace(vocab_size=300), student)
    with pytest.raises(ValueError, match="mask_token_id 7 != student mask_token_id 250"):
        check_vocab_compatible(student.replace(mask_token_id=7), student)
    with pytest.raises(ValueError, match="padded vocabulary 384 != student padded vocabulary 256"):
        check_vocab_compatible(student.replace(padded_vocab=384), student)
    check_vocab_compatible(teacher_config(), student)  # a larger teacher with the same vocabulary is fine


def test_bad_batches_raise_clear_errors(runtime, teacher_ckpt):
    path, _ = teacher_ckpt
    teacher = FrozenTeacher.from_checkpoint(str(path), student_config())
    r = synthetic_rollout(vocab_size=250, batch_size=2)
    prompt_valid, answer_valid = r.prompt_valid.clone(), r.answer_valid.clone()
    prompt_valid[0, -1] = False
    answer_valid[0, 0] = False
    with pytest.raises(ValueError, match="left-padded"):
        teacher.answer_logits(r.prompt_ids, prompt_valid, r.answer_ids, r.answer_valid, 2)
    with pytest.raises(ValueError, match="right-padded"):
        teacher.answer_logits(r.prompt_ids, r.prompt_valid, r.answer_ids, answer_valid, 2)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer, got 0"):
        microbatch_rows(2, 0)


def test_flex_attention_teacher_matches_the_reference(runtime, teacher_ckpt):
    """The teacher with FlexAttention (model.attention_backend applies to it) gives the unpadded
    causal reference's logits, as the dense mask does."""
    from opdlm_megatron.model.build import build_model as build

    path, config = teacher_ckpt
    dense = FrozenTeacher.from_checkpoint(str(path), student_config())
    flex_model = build(config.replace(attention_backend="flex"), "teacher")
    flex_model.load_state_dict(dense.model.state_dict(), strict=False)
    flex = FrozenTeacher(flex_model, config.replace(attention_backend="flex"), student_config())
    result = synthetic_rollout(vocab_size=250, batch_size=3, seed=1)
    logits = flex.answer_logits(result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid,
                                micro_batch_size=2)
    for (b, i), ref in unpadded_reference(dense.model, result).items():
        assert (logits[b, i] - ref).abs().max() < 1e-5, (b, i)


def test_causal_kernel_teacher_matches_the_reference(runtime, teacher_ckpt):
    """Built with megatron's causal mask type (Transformer Engine's fused causal attention on GPUs), the
    teacher takes no mask: its rows are repacked with the padding after the tokens, and it gives the
    unpadded reference's logits, top-k and NLL; TCS's branches, which need the arbitrary mask, refuse it."""
    from megatron.core.transformer.enums import AttnMaskType

    from opdlm_megatron.model.build import uses_causal_kernel

    path, config = teacher_ckpt
    dense = FrozenTeacher.from_checkpoint(str(path), student_config())
    causal_model = build_model(config, "teacher", attn_mask_type=AttnMaskType.causal)
    causal_model.load_state_dict(dense.model.state_dict(), strict=False)
    assert uses_causal_kernel(causal_model) and not uses_causal_kernel(dense.model)
    causal = FrozenTeacher(causal_model, config, student_config())
    result = synthetic_rollout(vocab_size=250, batch_size=3, seed=1)
    assert not result.prompt_valid.all()  # left padding to move
    args = (result.prompt_ids, result.prompt_valid, result.answer_ids, result.answer_valid)
    logits = causal.answer_logits(*args, micro_batch_size=2)
    for (b, i), ref in unpadded_reference(dense.model, result).items():
        assert (logits[b, i] - ref).abs().max() < 1e-5, (b, i)
    top, ref_top = causal.answer_logits(*args, 2, top_k=6), dense.answer_logits(*args, 2, top_k=6)
    valid = result.answer_valid
    assert torch.equal(top.indices[valid], ref_top.indices[valid])
    assert (top.answer_nll - ref_top.answer_nll).abs().max() < 1e-5
    with pytest.raises(ValueError, match="arbitrary mask, not the causal kernel"):
        causal.branch_log_probs(*args, forks=torch.tensor([[0, 1]]), candidates=torch.tensor([[5, 6]]),
                                ends=torch.tensor([3]), micro_batch_size=2)
