"""TCS targets (``objectives/tcs.py``): the branch attention layout against a brute-force rule, the
corrected targets q_hat against a brute force that runs the teacher once per candidate and position,
the routed estimator's expectation, the loss against a dense float64 reference, and refusals.
TP=2 / PP=2 == TP=1 runs in tests/test_objectives_parallel.py."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron.model import masks
from opdlm_megatron.model.losses import DivergenceConfig, TeacherTopK
from opdlm_megatron.model.build import build_model
from opdlm_megatron.objectives import StateContext, TargetTools, get_objective
from opdlm_megatron.objectives.scoring import StudentScores
from opdlm_megatron.objectives.tcs import route
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.student import student_step
from opdlm_megatron.distill.teacher import FrozenTeacher
from opdlm_megatron.objectives.tcs import TCSConfig
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.distributed.student_data import EOS, student_config, synthetic_rollout
from tests.distributed.train_common import tiny_train_dict

K = 4


# ------------------------------------------------------------------------------- branch layout
def _brute_branch_allowed(trunk_len, branch, fork, pos, valid):
    """Query q may see key k: trunk q -> trunk k at or before q; branch q -> trunk k at or before its
    fork block, and its own branch's tokens at or before its position; padding queries see all."""
    seq = trunk_len + len(branch)
    allowed = torch.zeros(seq, seq, dtype=torch.bool)
    for q in range(seq):
        for k in range(seq):
            if q >= trunk_len and not valid[q - trunk_len]:
                allowed[q, k] = True
                continue
            if k >= trunk_len and not valid[k - trunk_len]:
                continue
            if q < trunk_len:
                allowed[q, k] = k <= q
            elif k < trunk_len:
                allowed[q, k] = k <= fork[q - trunk_len]
            else:
                same = branch[q - trunk_len] == branch[k - trunk_len]
                allowed[q, k] = bool(same and pos[k - trunk_len] <= pos[q - trunk_len])
    return allowed


def test_branch_layout_matches_brute_force_and_flex():
    trunk_len = 6
    trunk = masks.causal_layout(torch.ones(1, trunk_len, dtype=torch.bool))
    # two branches forking after position 2 and one after 4, then padding
    branch = [1, 1, 2, 2, 3, 0, 0]
    fork = [2, 2, 2, 2, 4, 0, 0]
    pos = [3, 4, 3, 4, 5, 0, 0]
    valid = [True] * 5 + [False] * 2
    layout = masks.branch_layout(trunk, torch.tensor([branch]), torch.tensor([fork]), torch.tensor([pos]),
                                 torch.tensor([valid]))
    want = _brute_branch_allowed(trunk_len, branch, fork, pos, valid)
    assert torch.equal(layout.allowed()[0], want)
    # cutting and re-joining columns keeps the rule (what KV caches and pad_batch do)
    joined = masks.AttentionLayout.cat([layout.columns(0, 8), layout.columns(8)])
    assert torch.equal(joined.allowed(), layout.allowed())
    assert torch.equal(layout.pad_columns(16).allowed()[0, :13, :13], want)
    pytest.importorskip("torch.nn.attention.flex_attention")
    tiles = layout.flex_block_mask(block_size=4).to_dense()[0, 0]
    seq = want.shape[0]
    for i in range(-(-seq // 4)):
        for j in range(-(-seq // 4)):
            assert bool(tiles[i, j]) == bool(want[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].any())


def test_branch_layout_refuses_bad_input():
    trunk = masks.causal_layout(torch.ones(1, 3, dtype=torch.bool))
    one = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="branch ids >= 1"):
        masks.branch_layout(trunk, 0 * one, one, one, torch.ones(1, 1, dtype=torch.bool))


# ----------------------------------------------------------------------------- corrected targets
@pytest.fixture(scope="module")
def models():
    config = student_config()
    with initialize_runtime(device="cpu", seed=41):
        teacher = build_model(config, "teacher")
        student = build_model(config, "student")
        yield SimpleNamespace(config=config, teacher=teacher, student=student)


def _batch(config, objective, route_prob=1.0, rows=3, seed=21):
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=rows, seed=seed)
    ctx = StateContext(mask_token_id=config.mask_token_id, block_size=config.block_size, end_of_turn_ids=[EOS])
    obj = get_objective(objective)
    obj.settings = TCSConfig(weight=1.0, candidates=K, route_prob=route_prob)
    return obj, obj.build(result, torch.Generator().manual_seed(5), ctx)


def _fake_scorer(argmax_of):
    def score(answers, xt, positions, split_data_parallel=False):
        return StudentScores(torch.zeros(answers.answer_ids.shape), argmax_of(answers))
    return score


def _logp(model, config, ids):
    """Teacher log-probabilities (real tokens only, float64) of a causal forward over ``ids``."""
    x = torch.tensor([ids])
    layout = masks.causal_layout(torch.ones_like(x, dtype=torch.bool))
    with torch.no_grad():
        logits = model(x, layout.position_ids, layout.dense_mask())[0].double()
    real = ~config.unused_token_mask(0, logits.shape[-1])
    return F.log_softmax(logits.masked_fill(~real, float("-inf")), -1)


def _brute_q_hat(model, config, r, b, i):
    """q_hat of answer position i of row b: the teacher run once per candidate (full causal forwards)."""
    prompt = r.prompt_ids[b][r.prompt_valid[b]].tolist()
    answer = r.answer_ids[b][r.answer_valid[b]].tolist()
    q = _logp(model, config, prompt + answer[:i])[-1].exp()
    candidates = torch.topk(q, K).indices.tolist()
    end = min((i // config.block_size + 1) * config.block_size, len(answer))
    scores = []
    for v in candidates:
        seq = prompt + answer[:i] + [v] + answer[i + 1:end]
        lp = _logp(model, config, seq)
        s = math.log(float(q[v]))
        for j in range(i + 1, end):
            s += float(lp[len(prompt) + j - 1, answer[j]])
        scores.append(s)
    mass = float(q[candidates].sum())
    q_hat = q.clone()
    q_hat[candidates] = mass * torch.softmax(torch.tensor(scores, dtype=torch.float64), -1)
    return q_hat


@pytest.mark.parametrize("top_k", [None, 8])
def test_corrected_targets_equal_brute_force(models, top_k):
    config = models.config
    obj, batch = _batch(config, "opd_tcs")
    r = batch.answers
    teacher = FrozenTeacher(models.teacher, config, config)
    with torch.no_grad():
        targets = teacher.targets(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, batch.supervised,
                                  micro_batch_size=2, top_k=top_k)
        tools = TargetTools(teacher, _fake_scorer(lambda a: torch.zeros_like(a.answer_ids)), config.block_size,
                            micro_batch_size=2, top_k=top_k, renormalize_top_k=False)
        refined, metrics = obj.refine_targets(batch, targets, tools)
    assert metrics["tcs_routed_share"] == 1.0  # route_prob 1: every supervised position
    positions = batch.supervised.nonzero().tolist()
    assert len(positions) >= 6
    real = ~config.unused_token_mask(0, config.padded_vocab_size(1))
    multi_token_blocks = 0
    for b, i in positions:
        want = _brute_q_hat(models.teacher, config, r, b, i)
        slot = int(refined.correction_index[b, i])
        assert slot >= 0 and float(refined.correction_weight[b, i]) == 1.0
        got = refined.correction_logits[slot]
        if top_k is None:
            got_q = torch.softmax(got.double().masked_fill(~real, float("-inf")), -1)
            assert torch.allclose(got_q, want, atol=2e-6), (b, i)
        else:  # not renormalised: q_hat(v) = exp(value - logsumexp) on the kept ids
            got_q = (got.values.double() - got.logsumexp.double()).exp()
            assert torch.allclose(got_q, want[got.indices], atol=2e-6), (b, i)
        end = min((i // config.block_size + 1) * config.block_size, int(r.answer_valid[b].sum()))
        multi_token_blocks += end - i > 1
    assert multi_token_blocks >= 3  # positions whose branches score later tokens of the block


def _teacher_argmax(models, batch, agree_rows):
    """The teacher's argmax at the supervised positions on ``agree_rows``, another token elsewhere."""
    r, top = batch.answers, torch.full_like(batch.answers.answer_ids, -1)
    for b, i in batch.supervised.nonzero().tolist():
        prompt = r.prompt_ids[b][r.prompt_valid[b]].tolist()
        best = int(_logp(models.teacher, models.config, prompt + r.answer_ids[b, :i].tolist())[-1].argmax())
        top[b, i] = best if b in agree_rows else best + 1
    return top


def test_routing_by_argmax_disagreement_and_weights(models):
    config = models.config
    obj, batch = _batch(config, "opd_tcs", route_prob=0.25)
    r = batch.answers
    teacher = FrozenTeacher(models.teacher, config, config)
    with torch.no_grad():
        targets = teacher.targets(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, batch.supervised, 2)
        top = _teacher_argmax(models, batch, agree_rows=[0])  # the student agrees on row 0 only
        tools = TargetTools(teacher, _fake_scorer(lambda a: top), config.block_size, micro_batch_size=2)
        refined, metrics = obj.refine_targets(batch, targets, tools)
    for b, i in batch.supervised.nonzero().tolist():
        routed = int(refined.correction_index[b, i]) >= 0
        agree = b == 0
        assert routed == (not agree or float(batch.uniform[b, i]) < 0.25), (b, i)
        if routed:
            assert float(refined.correction_weight[b, i]) == pytest.approx(4.0 if agree else 1.0)


def test_routed_estimator_expectation_equals_the_full_sum():
    g = torch.Generator().manual_seed(3)
    n, draws = 12, 200_000
    values = torch.randn(n, generator=g, dtype=torch.float64)
    disagree = torch.rand(n, generator=g) < 0.3
    uniform = torch.rand(draws, n, generator=g, dtype=torch.float64)
    routed, weights = route(disagree.expand(draws, n), uniform, route_prob=0.1, weight=0.7)
    estimates = (weights * values).sum(-1)
    mean, se = float(estimates.mean()), float(estimates.std() / math.sqrt(draws))
    assert abs(mean - 0.7 * float(values.sum())) < 4 * se, (mean, 0.7 * float(values.sum()), se)
    assert bool(routed[:, disagree].all())  # disagreements are always routed
    share = float(routed[:, ~disagree].double().mean())
    assert share == pytest.approx(0.1, abs=0.005)


def test_loss_is_opd_plus_weighted_correction(models):
    """student_step's loss on TCS targets == dense float64 sum of KL(q) + w (KL(q_hat) - KL(q))."""
    config = models.config
    obj, batch = _batch(config, "opd_tcs", route_prob=0.5)
    r = batch.answers
    teacher = FrozenTeacher(models.teacher, config, config)
    top = _teacher_argmax(models, batch, agree_rows=[0, 1, 2])
    with torch.no_grad():
        targets = teacher.targets(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, batch.supervised, 2)
        refined, _ = obj.refine_targets(batch, targets, TargetTools(teacher, _fake_scorer(lambda a: top),
                                                                    config.block_size, micro_batch_size=2))
        out = student_step(models.student, config, batch, refined, DivergenceConfig(chunk_tokens=3),
                           micro_batch_size=2, forward_only=True)
    opd = masks.opd_training_batch(r.prompt_ids, r.prompt_valid, r.answer_ids, batch.xt, r.answer_valid,
                                   config.block_size)
    with torch.no_grad():
        s_logits = models.student(opd.input_ids, opd.position_ids, opd.layout.dense_mask()).double()
    real = ~config.unused_token_mask(0, s_logits.shape[-1])
    total, routed = 0.0, 0
    for b, i in batch.supervised.nonzero().tolist():
        log_s = F.log_softmax(s_logits[b, opd.prediction_columns[b, i]].masked_fill(~real, float("-inf")), -1)
        prompt = r.prompt_ids[b][r.prompt_valid[b]].tolist()
        log_q = _logp(models.teacher, config, prompt + r.answer_ids[b, :i].tolist())[-1]
        kl = float((log_q.exp() * (log_q - log_s)).masked_fill(~real, 0).sum())
        slot = int(refined.correction_index[b, i])
        if slot >= 0:
            routed += 1
            q_hat = _brute_q_hat(models.teacher, config, r, b, i)
            kl_hat = float((q_hat * (q_hat.log() - log_s)).masked_fill(~real | (q_hat == 0), 0).sum())
            kl += float(refined.correction_weight[b, i]) * (kl_hat - kl)
        total += kl
    assert 0 < routed < int(batch.supervised.sum())
    assert out["loss"] == pytest.approx(total / int(batch.supervised.sum()), rel=1e-5)


# ------------------------------------------------------------------------------------ refusals
def test_config_refusals(tmp_path):
    base = tiny_train_dict(str(tmp_path), "data.jsonl", "ckpt", objective="opd_tcs")
    with pytest.raises(ValueError, match="block_size must be > 1"):
        train_config_from_dict({**base, "block_size": 1})
    with pytest.raises(ValueError, match="loss.top_k 4 keeps fewer teacher tokens than tcs.candidates 8"):
        train_config_from_dict({**base, "loss": {"top_k": 4}})
    with pytest.raises(ValueError, match=r"tcs.route_prob must be in \(0, 1\], got 0.0"):
        train_config_from_dict({**base, "tcs": {"route_prob": 0.0}})
    config = student_config(block_size=1)
    obj = get_objective("opd_tcs")
    ctx = StateContext(mask_token_id=config.mask_token_id, block_size=1, end_of_turn_ids=[EOS])
    with pytest.raises(ValueError, match="block size must be > 1"):
        obj.build(synthetic_rollout(config.vocab_size, 4), torch.Generator(), ctx)


def test_top_k_target_values_keep_their_normaliser():
    """Replacing the candidates' values keeps the kept ids' total mass (renormalised or not)."""
    from opdlm_megatron.objectives.tcs import _corrected_logits, tcs_log_targets
    from opdlm_megatron.distill.teacher import TeacherTargets

    values = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]])
    top = TeacherTopK(values, torch.tensor([[5, 1, 7, 2, 9]]), torch.tensor([4.0]))
    norm = torch.logsumexp(values, -1).double()
    logp = values[:, :3].double() - norm[:, None]
    log_q_hat, log_mass = tcs_log_targets(logp, torch.tensor([[0.0, -2.0, 1.0]], dtype=torch.float64))
    targets = TeacherTargets(torch.zeros(1, 1, dtype=torch.long), top)
    fixed = _corrected_logits(targets, torch.tensor([0]), top.indices[:, :3], (log_q_hat + norm[:, None]).float())
    assert torch.logsumexp(fixed.values, -1).item() == pytest.approx(norm.item(), rel=1e-6)
    assert torch.equal(fixed.values[:, 3:], values[:, 3:])
    assert math.exp(log_mass.item()) == pytest.approx(float(torch.softmax(values, -1)[0, :3].sum()), rel=1e-6)


def test_capped_weights():
    disagree = torch.tensor([True, False, False])
    routed, weights = route(disagree, torch.tensor([0.5, 0.05, 0.5]), route_prob=0.1, weight=1.0, max_weight=1.0)
    assert routed.tolist() == [True, True, False]
    assert weights.tolist() == [1.0, 1.0, 0.0]  # 1 / 0.1 = 10 capped at 1
