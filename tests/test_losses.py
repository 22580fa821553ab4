"""Vocab-parallel chunked losses against dense single-process torch.nn.functional references
(values and gradients, TP=1 here, TP=2 via torchrun), their memory footprint, and the loss masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron.model.losses import (
    DivergenceConfig,
    TeacherTopK,
    answer_loss_mask,
    divergence,
    masked_diffusion_nll,
    row_mean,
)

VARIANTS = [(None, True), (7, True), (7, False)]  # (top_k, renormalize_top_k)
KINDS = ["forward_kl", "reverse_kl", "jsd"]


# ---------------------------------------------------------------------------- dense references
def reference_divergence(student, teacher, kind, beta=0.5, top_k=None, renormalize=True, excluded=None):
    """Dense float64 reference with torch.nn.functional on the full vocabulary."""
    s, t = student.double(), teacher.double()
    if excluded is not None:
        s, t = s[:, ~excluded], t[:, ~excluded]
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if top_k is not None:
        _, idx = t.topk(top_k, -1)
        if renormalize:
            log_q, log_p = F.log_softmax(s.gather(-1, idx), -1), F.log_softmax(t.gather(-1, idx), -1)
        else:
            log_q, log_p = log_q.gather(-1, idx), log_p.gather(-1, idx)
    if kind == "forward_kl":  # F.kl_div(input=log q, target=log p) = sum p (log p - log q)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    return (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1))


def make_logits(n=37, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g) * 2.5
    teacher = torch.randn(n, vocab, generator=g) * 2.5
    weights = torch.rand(n, generator=g)
    excluded = torch.zeros(vocab, dtype=torch.bool)
    excluded[-5:] = True  # padded rows
    excluded[vocab // 2] = True  # a [MASK] row inside the vocabulary
    return student, teacher, weights, excluded


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k,renormalize", VARIANTS)
def test_divergence_matches_dense_reference(runtime, kind, top_k, renormalize):
    student, teacher, weights, excluded = make_logits()
    cfg = DivergenceConfig(kind=kind, jsd_beta=0.3, top_k=top_k, renormalize_top_k=renormalize, chunk_tokens=8)
    s = student.clone().requires_grad_()
    values = divergence(s, teacher, cfg, excluded_columns=excluded)
    (values * weights).sum().backward()

    s_ref = student.double().requires_grad_()
    ref = reference_divergence(s_ref, teacher, kind, 0.3, top_k, renormalize, excluded)
    (ref * weights.double()).sum().backward()

    assert values.dtype == torch.float32 and values.shape == (student.shape[0],)
    assert (values.double() - ref).abs().max() < 1e-5
    assert (s.grad.double() - s_ref.grad).abs().max() < 1e-5
    assert s.grad[:, excluded].abs().max() == 0


@pytest.mark.parametrize("renormalize", [True, False])
def test_teacher_top_k_gives_the_same_loss_as_full_teacher_logits(runtime, renormalize):
    student, teacher, weights, excluded = make_logits()
    top = TeacherTopK.from_logits(teacher, 9, excluded_columns=excluded, chunk_tokens=10)
    assert top.values.shape == (student.shape[0], 9)
    for kind in KINDS:
        cfg = DivergenceConfig(kind=kind, top_k=7, renormalize_top_k=renormalize, chunk_tokens=6)
        s_full, s_top = student.clone().requires_grad_(), student.clone().requires_grad_()
        (divergence(s_full, teacher, cfg, excluded) * weights).sum().backward()
        (divergence(s_top, top, cfg, excluded) * weights).sum().backward()  # the first 7 of the 9 stored
        s_ref = student.double().requires_grad_()
        ref = reference_divergence(s_ref, teacher, kind, 0.5, 7, renormalize, excluded)
        (ref * weights.double()).sum().backward()
        assert (s_top.grad - s_full.grad).abs().max() < 1e-6
        assert (s_top.grad.double() - s_ref.grad).abs().max() < 1e-5


def test_divergence_is_zero_for_identical_distributions_and_chunking_invariant(runtime):
    student, teacher, _, excluded = make_logits(n=20)
    for kind in KINDS:
        same = divergence(student, student, DivergenceConfig(kind=kind), excluded_columns=excluded)
        assert same.abs().max() < 1e-5
        a = divergence(student, teacher, DivergenceConfig(kind=kind, chunk_tokens=3))
        b = divergence(student, teacher, DivergenceConfig(kind=kind, chunk_tokens=1000))
        assert torch.equal(a, b)


def test_bf16_logits_give_bf16_gradients(runtime):
    student, teacher, weights, excluded = make_logits(n=16)
    s = student.bfloat16().requires_grad_()
    values = divergence(s, teacher.bfloat16(), DivergenceConfig(), excluded_columns=excluded)
    (values * weights).sum().backward()
    s_ref = student.bfloat16().double().requires_grad_()
    ref = reference_divergence(s_ref, teacher.bfloat16(), "forward_kl", excluded=excluded)
    (ref * weights.double()).sum().backward()
    assert s.grad.dtype == torch.bfloat16
    assert (values.double() - ref).abs().max() < 1e-5  # computed in fp32 from the bf16 inputs
    assert (s.grad.double() - s_ref.grad).abs().max() < 1e-2  # bf16 rounding of the gradient


def test_masked_diffusion_nll_matches_cross_entropy(runtime):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    student, _, weights, excluded = make_logits()
    real = (~excluded).nonzero().squeeze(1)
    targets = real[torch.randint(0, real.numel(), (student.shape[0],), generator=torch.Generator().manual_seed(1))]
    s = student.clone().requires_grad_()
    nll = masked_diffusion_nll(s, targets, excluded_columns=excluded, chunk_tokens=5)
    (nll * weights).sum().backward()

    s_ref = student.double().requires_grad_()
    masked = s_ref.masked_fill(excluded, float("-inf"))
    ref = F.cross_entropy(masked, targets, reduction="none")
    (ref * weights.double()).sum().backward()
    assert (nll.double() - ref).abs().max() < 1e-5
    assert (s.grad.double() - s_ref.grad).abs().max() < 1e-5
    # megatron-core's own vocab-parallel cross entropy agrees without excluded columns
    mcore = vocab_parallel_cross_entropy(student.clone()[None], targets[None])[0]
    assert (masked_diffusion_nll(student, targets) - mcore).abs().max() < 1e-5


def _profiled_peak_bytes(fn) -> int:
    """Peak of live CPU tensor memory allocated while ``fn`` runs (torch profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def test_chunked_loss_allocates_no_full_fp32_copy(runtime):
    n, vocab, chunk = 256, 1024, 8
    student, teacher, _, _ = make_logits(n=n, vocab=vocab)
    student, teacher = student.bfloat16().requires_grad_(), teacher.bfloat16()
    full_fp32 = n * vocab * 4
    chunk_fp32 = chunk * vocab * 4
    grad_bytes = n * vocab * 2  # the bf16 gradient itself

    def chunked():
        divergence(student, teacher, DivergenceConfig(kind="jsd", chunk_tokens=chunk)).sum().backward()

    peak = _profiled_peak_bytes(chunked)
    print(f"chunked peak {peak / 1e6:.2f} MB = bf16 grad {grad_bytes / 1e6:.2f} MB + "
          f"{(peak - grad_bytes) / chunk_fp32:.1f} fp32 chunks; a full fp32 copy is {full_fp32 / 1e6:.2f} MB")
    # the measurement sees the gradient and the chunk temporaries...
    assert peak >= grad_bytes + chunk_fp32
    # ...and nothing near a full fp32 copy of the logits: a few chunks at most
    assert peak - grad_bytes < 12 * chunk_fp32
    assert peak - grad_bytes < full_fp32 / 2


def naive_loss_mask(ids, valid, eot_ids, include):
    out = []
    for row, vrow in zip(ids.tolist(), valid.tolist()):
        keep, ended = [], False
        for tok, v in zip(row, vrow):
            is_eot = v and tok in eot_ids
            keep.append(v and not ended and (include or not is_eot))
            ended = ended or is_eot
        out.append(keep)
    return torch.tensor(out)


@pytest.mark.parametrize("include", [True, False])
def test_answer_loss_mask_matches_naive_rule(include):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (20, 12), generator=g)
    lengths = torch.randint(0, 13, (20,), generator=g)
    valid = torch.arange(12)[None] < lengths[:, None]
    got = answer_loss_mask(ids, valid, [2, 5], include_end_of_turn=include)
    assert torch.equal(got, naive_loss_mask(ids, valid, {2, 5}, include))


def test_row_mean_matches_naive_mean_of_means():
    g = torch.Generator().manual_seed(0)
    per_token = torch.rand(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) < 0.4
    mask[2] = False  # a row without tokens is skipped
    rows = [per_token[b][mask[b]].mean().item() for b in range(5) if mask[b].any()]
    assert math.isclose(float(row_mean(per_token, mask)), sum(rows) / len(rows), rel_tol=1e-6)
    assert math.isclose(float(row_mean(per_token, mask, num_rows=10)), sum(rows) / 10, rel_tol=1e-6)
    assert float(row_mean(per_token, torch.zeros_like(mask))) == 0.0


def test_bad_inputs_raise_clear_errors(runtime):
    with pytest.raises(ValueError, match="'kl'"):
        DivergenceConfig(kind="kl")
    with pytest.raises(ValueError, match="jsd_beta .* got 1.0"):
        DivergenceConfig(kind="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="top_k .* got 0"):
        DivergenceConfig(top_k=0)
    with pytest.raises(ValueError, match="chunk_tokens .* got 0"):
        DivergenceConfig(chunk_tokens=0)
    s, t = torch.randn(4, 10), torch.randn(4, 11)
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
        divergence(s, t, DivergenceConfig())
    with pytest.raises(ValueError, match="excluded_columns"):
        divergence(s, s, DivergenceConfig(), excluded_columns=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="target id 10 is outside"):
        masked_diffusion_nll(s, torch.tensor([0, 1, 10, 2]))
    top = TeacherTopK.from_logits(s, 3)
    with pytest.raises(ValueError, match="needs DivergenceConfig.top_k"):
        divergence(s, top, DivergenceConfig())
    with pytest.raises(ValueError, match="top_k = 5"):
        divergence(s, top, DivergenceConfig(top_k=5))
    with pytest.raises(ValueError, match="one \\[B, A\\] shape"):
        row_mean(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.distributed
def test_tensor_parallel_losses_match_dense_reference():
    """TP=2: each rank holds half of the vocabulary; values and gradient shards match the dense
    reference (tests/distributed/losses_tp2.py, run inside the shared student_parallel.py launch)."""
    from tests.distributed.student_data import parallel_check_results

    _, _, errors = parallel_check_results()
    assert len(errors) == len(KINDS) * (len(VARIANTS) + 2) + 1  # + TeacherTopK variants + cross entropy
    for name, (value_err, grad_err) in errors.items():
        assert value_err < 1e-5 and grad_err < 1e-5, (name, value_err, grad_err)
