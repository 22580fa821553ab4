"""The objectives package: registry, the first layout's losses reproduced, one pipeline for every
objective (a new one is one class), cached teacher answers, the paper's token/FLOP counters, fp16,
and the strict self-distillation teacher copy."""

import json
import math
import os

import pytest
import torch

from opdlm_megatron.checkpoint.model import save_model_checkpoint
from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.model.build import build_model
from opdlm_megatron.objectives import Objective, get_objective, objective_names, register_objective
from opdlm_megatron.objectives.base import _REGISTRY, masked_state_batch
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.distributed.train_common import TINY_MODEL, naive_rollout, tiny_train_dict, write_token_prompts

LEGACY_LOSSES = os.path.join(os.path.dirname(__file__), "data", "legacy_losses.json")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    ckpt = root / "init"
    with initialize_runtime(device="cpu", seed=7):
        config = ModelConfig(**TINY_MODEL)
        save_model_checkpoint(build_model(config, "student"), str(ckpt), config)
    return dict(root=root, ckpt=str(ckpt), data=write_token_prompts(str(root / "prompts.jsonl"), num=6))


def _train(cfg, rollout_fn=None, until=None):
    from opdlm_megatron.training.trainer import Trainer

    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rollout_fn)
        try:
            history = trainer.fit(until)
        finally:
            trainer.close()
    return history


def test_registry_names_and_declarations():
    assert {"opd", "opd_off", "kd_off", "sft", "mdlm", "ar"} <= set(objective_names())
    table = {name: (get_objective(name).answers, get_objective(name).distill) for name in objective_names()}
    assert table["opd"] == ("student", True) and table["opd_off"] == ("student", True)
    assert table["kd_off"] == ("teacher", True) and table["sft"] == ("teacher", False)
    assert table["mdlm"] == ("dataset", False) and table["ar"] == ("dataset", False)
    assert not get_objective("ar").needs_teacher and get_objective("sft").needs_teacher
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        get_objective("ppo")


def test_first_layout_losses_are_reproduced(assets, tmp_path):
    """The losses and grad norms the first layout's trainer (commit 1fd98b9) gave on these seeds,
    with its config keys (one rollout of prompts_per_step prompts per step, per-row normalisation,
    one t per block), for opd, opd_off, mdlm and sft (engine rollouts, sampled at temperature 1)."""
    with open(LEGACY_LOSSES) as f:
        recorded = json.load(f)
    for objective in ("opd", "opd_off", "mdlm", "sft"):
        curriculum = (dict(min_length=12, max_length=12, warmup_steps=1) if objective == "sft"
                      else dict(min_length=8, max_length=16, warmup_steps=2))
        cfg = train_config_from_dict(dict(
            objective=objective, steps=3, prompts_per_step=2, micro_batch_size=1, seed=11,
            run_dir=str(tmp_path / objective), model=dict(student_checkpoint=assets["ckpt"]),
            parallel=dict(device="cpu"), data=dict(source="token_ids", path=assets["data"], shuffle=True, seed=5),
            rollout=dict(threshold=0.9, temperature=0.0 if objective == "sft" else 1.0), curriculum=curriculum,
            optim=dict(lr=3e-3, min_lr=3e-4, warmup_steps=1), checkpoint=dict(resume=False),
            logging=dict(progress_bar=False),
            loss=dict(normalization="row", t_sampling="block", state_selection="trajectory")))
        history = _train(cfg)
        assert len(history) == len(recorded[objective]) == 3
        for got, want in zip(history, recorded[objective]):
            assert got["tokens"] == want["tokens"], objective
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), objective
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), objective


def test_a_new_objective_is_one_class(assets, tmp_path):
    """Registering a subclass is all it takes: here every answer token is masked (one-shot block
    prediction from the clean prefix), supervised by the teacher on the student's rollouts."""

    @register_objective
    class AllMasked(Objective):
        name = "test_all_masked"
        answers = "student"
        distill = True

        def build(self, answers, generator, ctx):
            xt = torch.full_like(answers.answer_ids, ctx.mask_token_id)
            return masked_state_batch(answers, xt, ctx, distill=True)

    try:
        cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                     objective="test_all_masked", train=dict(steps=2)))
        history = _train(cfg, naive_rollout)
        assert all(h["partially_masked_share"] == 0.0 for h in history)  # only fully masked blocks
        assert all(math.isfinite(h["loss"]) and h["tokens"] > 0 for h in history)
    finally:
        _REGISTRY.pop("test_all_masked")


@pytest.mark.parametrize("objective", ["sft", "kd_off"])
def test_teacher_answers_are_generated_once_and_cached(assets, tmp_path, objective):
    """Two epochs over 2 prompts: the teacher answers each prompt once, to full length (EOS or
    teacher_max_new_tokens), and the second epoch (and a restarted run) reads the cache."""
    data = write_token_prompts(str(tmp_path / "two.jsonl"), num=2, seed=3)
    calls = []

    def counting(model, config, prompts, decode):
        calls.append((config.block_size, len(prompts), decode.max_new_tokens))
        return naive_rollout(model, config, prompts, decode)

    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "run"), data, assets["ckpt"], objective=objective, train=dict(steps=None),
        data=dict(epochs=2), rollout=dict(teacher_max_new_tokens=20),
        curriculum=dict(min_length=4, max_length=8, warmup_rollouts=1), checkpoint=dict(resume=False)))
    history = _train(cfg, counting)
    assert len(history) == 2  # 2 epochs x 2 prompts / 2 per step
    assert calls == [(1, 2, 20)]  # one autoregressive decode of both prompts, full length (not the curriculum's)
    with open(tmp_path / "run" / "teacher_answers.jsonl") as f:
        cached = [json.loads(line) for line in f]
    assert sorted(r["sample"] for r in cached) == [0, 1]
    assert all(r["finished"] or len(r["answer_ids"]) == 20 for r in cached)
    assert all(h["paper_tokens"] == 2 * 20 for h in history)  # samples x generation length
    calls.clear()
    _train(cfg, counting)  # a new run in the same directory reads the cache
    assert calls == []


def test_paper_tokens_and_flops(assets, tmp_path):
    """T = samples x generation length (Table 1); FLOPs = 2 N_teacher T + 6 N_student T (eq. 7)."""
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=3), curriculum=dict(min_length=4, max_length=12,
                                                                                      warmup_rollouts=2)))
    history = _train(cfg, naive_rollout)
    with initialize_runtime(device="cpu", seed=0):
        model = build_model(ModelConfig(**TINY_MODEL), "student")
        counted = sum(p.numel() for p in model.parameters())
    assert ModelConfig(**TINY_MODEL).num_parameters() == counted
    lengths = [4, 8, 12]  # curriculum per rollout (one rollout per step here), whole blocks of 4
    for h, length in zip(history, lengths):
        assert h["rollout_len"] == length and h["paper_tokens"] == 2 * length
        assert h["flops"] == pytest.approx(8 * counted * 2 * length)
    assert history[-1]["paper_tokens_total"] == 2 * sum(lengths)
    assert history[-1]["flops_total"] == pytest.approx(8 * counted * 2 * sum(lengths))


def test_fp16_tracks_fp32_and_bf16(assets, tmp_path):
    """fp16 training connects megatron's loss scaler to the schedule: the same ``ar`` run in fp32,
    bf16 and fp16 gives the same losses within each precision's tolerance."""
    runs = {}
    for dtype in ("float32", "bfloat16", "float16"):
        # a loss scale at which no gradient element (< 256 here) can overflow fp16 on any CPU's kernels
        cfg = train_config_from_dict(tiny_train_dict(
            str(tmp_path / dtype), assets["data"], assets["ckpt"], objective="ar", train=dict(steps=6),
            model=dict(student_dtype=dtype), optim=dict(lr=1e-2, min_lr=1e-2, warmup_steps=0, initial_loss_scale=256.0),
            checkpoint=dict(resume=False)))
        history = _train(cfg)
        assert all(h["skipped"] == 0 for h in history), dtype  # no overflow at the initial loss scale
        runs[dtype] = [h["loss"] for h in history]
    fp32 = runs["float32"]
    assert fp32[-1] < 0.9 * fp32[0]  # it trains, so a no-op update would show
    assert runs["float16"] == pytest.approx(fp32, rel=2e-2)
    assert runs["bfloat16"] == pytest.approx(fp32, rel=5e-2)


def test_fp16_overflow_lowers_the_loss_scale_instead_of_skipping_every_step(assets, tmp_path):
    """At a loss scale that overflows fp16 gradients, megatron's scaler skips the step and halves the
    scale (after its hysteresis); the trainer's own inf/NaN-gradient check must leave those steps to it,
    or the scale never drops and every later step is skipped too."""
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "fp16"), assets["data"], assets["ckpt"], objective="ar", train=dict(steps=30),
        model=dict(student_dtype="float16"), optim=dict(lr=1e-2, min_lr=1e-2, warmup_steps=0,
                                                        initial_loss_scale=2.0 ** 24),
        checkpoint=dict(resume=False)))
    from opdlm_megatron.training.trainer import Trainer

    scales, history = [], []
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt)
        for _ in range(30):
            scales.append(float(trainer.optimizer.get_loss_scale()))
            history.append(trainer.train_step())
        trainer.close()
    skipped = [h["skipped"] for h in history]
    assert skipped[0] == 1.0, "2**24 overflows fp16 gradients"
    assert skipped[-4:] == [0.0] * 4, skipped
    assert scales[-1] < scales[0], scales
    assert all(math.isfinite(h["loss"]) for h in history)


def test_self_distillation_teacher_copy_is_strict(assets, tmp_path, monkeypatch):
    import opdlm_megatron.training.build as build_module
    import opdlm_megatron.training.trainer as trainer_module

    real_build = build_module.build_model

    def mismatched(config, role="student", **kwargs):
        return real_build(config.replace(qk_layernorm=True) if role == "teacher" else config, role, **kwargs)

    # the teacher is built by training.build.build_teacher_model (the one build path of both loops)
    monkeypatch.setattr(build_module, "build_model", mismatched)
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"]))
    with initialize_runtime(device="cpu", seed=0) as rt:
        with pytest.raises(ValueError, match="self-distillation teacher could not take the student's weights.*q_layernorm"):
            trainer_module.Trainer(cfg, rt, rollout_fn=naive_rollout)


@pytest.mark.parametrize("selection", ["trajectory", "all_rounds"])
def test_top_k_teacher_keeps_only_its_top_k(assets, tmp_path, selection):
    """With loss.top_k the trainer's teacher targets hold k values and ids per supervised position
    (not the [B, A, V/TP] logits), and the step trains. all_rounds: the teacher scores each answer once,
    so its targets cover the positions supervised in any of the answer's rows."""
    from opdlm_megatron.model.losses import TeacherTopK
    from opdlm_megatron.training.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=2), loss=dict(top_k=8, state_selection=selection)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        trainer.data.buffer = trainer.data._next_rollout()
        batch = trainer.data._supervised_batch(trainer.data.buffer, 0)
        targets, _ = trainer.data._teacher_targets(batch)
        assert isinstance(targets.logits, TeacherTopK)
        supervised = batch.supervised
        if batch.groups is not None:  # one row per answer: a position supervised in any of its rows
            answers = torch.unique_consecutive(batch.groups)
            supervised = torch.stack([batch.supervised[batch.groups == g].any(0) for g in answers])
        assert tuple(targets.logits.values.shape) == (int(supervised.sum()), 8)
        assert targets.nbytes < int(supervised.sum()) * trainer.config.padded_vocab_size(1) * 4 / 5
        history = [trainer.train_step() for _ in range(2)]
        trainer.close()
    assert all(math.isfinite(h["loss"]) for h in history)
