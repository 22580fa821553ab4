"""The OPD training loop on a tiny model (CPU, real megatron-core DDP/optimizer/schedules)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron import masks
from opdlm_megatron.checkpointing import load_model_checkpoint, save_model_checkpoint
from opdlm_megatron.config import ModelConfig
from opdlm_megatron.metrics import read_metrics
from opdlm_megatron.model import attention_mask, build_model
from opdlm_megatron.platform import initialize_runtime
from opdlm_megatron.train_config import train_config_from_dict
from tests.conftest import REPO_ROOT, run_torchrun
from tests.distributed.train_common import (TINY_MODEL, RecordingRollout, naive_rollout, tiny_train_dict,
                                            write_token_prompts)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    ckpt = root / "init"
    with initialize_runtime(device="cpu", seed=7):
        config = ModelConfig(**TINY_MODEL)
        save_model_checkpoint(build_model(config, "student"), str(ckpt), config)
    data = write_token_prompts(str(root / "prompts.jsonl"), num=6)
    data2 = write_token_prompts(str(root / "two.jsonl"), num=2, seed=3)
    return dict(ckpt=str(ckpt), data=data, data2=data2)


def _train(cfg, rollout_fn=naive_rollout, until=None, inspect=None):
    from opdlm_megatron.trainer import Trainer

    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rollout_fn)
        try:
            if inspect is not None:
                inspect(trainer, "before")
            history = trainer.fit(until)
            if inspect is not None:
                inspect(trainer, "after")
        finally:
            trainer.close()
    return history


def _dense_opd_loss(student, teacher, config, result, xt, eot_ids):
    """Independent reference: full-vocabulary forward KL, mean over masked xt tokens per row, then rows."""
    with torch.no_grad():
        full_valid = torch.cat([result.prompt_valid, result.answer_valid], 1)
        ids = torch.cat([result.prompt_ids, result.answer_ids], 1)
        causal = masks.causal_layout(full_valid)
        t_logits = teacher(ids, causal.position_ids, causal.dense_mask()).float()[..., :config.model_vocab_size]
        batch = masks.opd_training_batch(result.prompt_ids, result.prompt_valid, result.answer_ids, xt,
                                         result.answer_valid, config.block_size, config.logit_shift)
        s_logits = student(batch.input_ids, batch.position_ids, batch.layout.dense_mask()).float()
    # real tokens only: no padded rows, no [MASK]
    real = torch.tensor([i for i in range(config.model_vocab_size) if i != config.mask_token_id])
    s_logits, t_logits = s_logits[..., real], t_logits[..., real]
    P = result.prompt_ids.shape[1]
    rows = []
    for i in range(result.batch_size):
        per_tok = []
        for a in range(result.answer_ids.shape[1]):
            if not result.answer_valid[i, a] or xt[i, a] != config.mask_token_id:
                continue
            before = result.answer_ids[i, :a].tolist()
            if any(t in eot_ids for t in before):
                continue  # after the first end-of-turn
            p_log = F.log_softmax(t_logits[i, P + a - 1], -1)
            q_log = F.log_softmax(s_logits[i, batch.prediction_columns[i, a]], -1)
            per_tok.append(F.kl_div(q_log, p_log, log_target=True, reduction="sum"))
        if per_tok:
            rows.append(torch.stack(per_tok).mean())
    return float(torch.stack(rows).mean())


def test_opd_steps_decrease_loss_teacher_frozen_and_absent_from_checkpoint(assets, tmp_path):
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "run"), assets["data2"], assets["ckpt"], steps=6,
        data=dict(shuffle=False), optim=dict(lr=3e-3, min_lr=3e-3, warmup_steps=0),
        curriculum=dict(min_length=8, max_length=8, warmup_steps=1)))
    rec = RecordingRollout(naive_rollout)
    seen = {}

    def inspect(trainer, when):
        seen[when + "_teacher"] = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()
                                   if isinstance(v, torch.Tensor)}
        seen[when + "_student"] = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()
                                   if isinstance(v, torch.Tensor)}

    history = _train(cfg, rec, inspect=inspect)
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(h["skipped"] == 0 for h in history)
    assert history[0]["teacher_nll"] > 0 and history[0]["committed_per_forward"] >= 1.0
    assert history[-1]["tokens_trained"] == pytest.approx(sum(h["tokens"] for h in history))

    for key, value in seen["before_teacher"].items():  # teacher untouched by training
        assert torch.equal(value, seen["after_teacher"][key]), key
    changed = [k for k, v in seen["before_student"].items() if not torch.equal(v, seen["after_student"][k])]
    assert changed, "the student did not change"

    # checkpoint: exactly the trained student (not the teacher) + optimizer + trainer state
    ckpt = os.path.join(cfg.checkpoint_dir, "step_00000006")
    assert open(os.path.join(cfg.checkpoint_dir, "latest")).read().strip() == "step_00000006"
    from megatron.core import dist_checkpointing

    with initialize_runtime(device="cpu", seed=0):
        config = ModelConfig.load(ckpt)
        fresh = build_model(config, "student")
        load_model_checkpoint(fresh, ckpt)
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        student_keys = {v.key for v in fresh.sharded_state_dict().values() if not isinstance(v, ShardedObject)}
        for k, v in fresh.state_dict().items():
            if isinstance(v, torch.Tensor) and k in seen["after_student"]:
                assert torch.equal(v, seen["after_student"][k]), k
        saved = set(dist_checkpointing.load_tensors_metadata(ckpt).keys())
    model_keys = {k for k in saved if not k.startswith("optimizer.")}
    assert model_keys == student_keys  # one model's weights: the teacher's copy is not there
    assert any(k.startswith("optimizer.") for k in saved)
    assert not any("teacher" in k for k in saved)
    assert (fresh.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"]
            != seen["after_teacher"]["decoder.layers.0.mlp.linear_fc1.weight"]).any()


def test_step_loss_matches_dense_reference(assets, tmp_path):
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"], steps=1,
                                                 checkpoint=dict(resume=False)))
    from opdlm_megatron import states
    from opdlm_megatron.trainer import Trainer

    rec = RecordingRollout(naive_rollout)
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rec)
        student0 = build_model(trainer.config, "student")
        student0.load_state_dict(trainer.student.state_dict(), strict=False)
        metrics = trainer.train_step(0)
        result = rec.results[0]
        xt = states.select_states(result, "trajectory", trainer._step_generator(0), trainer.config.mask_token_id,
                                  block_size=trainer.config.block_size)
        ref = _dense_opd_loss(student0.eval(), trainer.teacher.model, trainer.config, result, xt,
                              trainer.config.eos_token_ids)
        trainer.close()
    assert metrics["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_interrupt_and_resume_gives_identical_losses(assets, tmp_path):
    common = dict(steps=4, optim=dict(lr=2e-3, min_lr=2e-4, warmup_steps=2),
                  curriculum=dict(min_length=4, max_length=12, warmup_steps=3),
                  rollout=dict(threshold=0.5, temperature=0.0))
    full = _train(train_config_from_dict(tiny_train_dict(str(tmp_path / "a"), assets["data"], assets["ckpt"], **common)))
    cfg_b = train_config_from_dict(tiny_train_dict(str(tmp_path / "b"), assets["data"], assets["ckpt"], **common))
    first = _train(cfg_b, until=2)
    assert os.path.isdir(os.path.join(cfg_b.checkpoint_dir, "step_00000002"))
    rest = _train(cfg_b)
    assert [h["step"] for h in rest] == [2, 3]
    for a, b in zip(full, first + rest):
        for key in ("loss", "lr", "rollout_len", "tokens_trained", "teacher_nll", "grad_norm"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert full[-1]["rollout_len"] == 12 and full[0]["rollout_len"] == 4


def test_nan_loss_is_skipped_or_stops_the_run(assets, tmp_path):
    from opdlm_megatron.trainer import NonFiniteLossError, Trainer

    def poison_step(trainer, step):
        def hook(module, args, output):
            if torch.is_grad_enabled() and trainer.step_under_test == step:
                return output * float("nan")
            return output
        trainer.student.register_forward_hook(hook)

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "skip"), assets["data"], assets["ckpt"], steps=3,
                                                 checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        poison_step(trainer, 1)
        records = []
        for step in range(3):
            trainer.step_under_test = step
            before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
            records.append(trainer.train_step(step))
            unchanged = all(torch.equal(v, dict(trainer.student.named_parameters())[k]) for k, v in before.items())
            assert unchanged == (step == 1), step
        trainer.close()
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"])

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "stop"), assets["data"], assets["ckpt"], steps=3,
                                                 nan_policy="stop", checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        poison_step(trainer, 0)
        trainer.step_under_test = 0
        with pytest.raises(NonFiniteLossError, match="step 0: non-finite loss nan"):
            trainer.train_step(0)
        trainer.close()


@pytest.mark.parametrize("objective", ["opd_off", "sft", "mdlm"])
def test_baseline_objectives_train(assets, tmp_path, objective):
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / objective), assets["data2"], assets["ckpt"], objective=objective, steps=4,
        data=dict(shuffle=False), optim=dict(lr=3e-3, min_lr=3e-3, warmup_steps=0),
        curriculum=dict(min_length=8, max_length=8, warmup_steps=1)))
    history = _train(cfg)
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    assert losses[-1] < losses[0], losses
    if objective == "mdlm":
        assert math.isnan(history[0]["rollout_len"])
    else:
        assert history[0]["rollout_len"] == 8


def test_cli_entry_point_with_rollout_engine(assets, tmp_path):
    """``python -m opdlm_megatron.train --config configs/tiny_cpu.yaml`` with the real engine."""
    from opdlm_megatron.train import main

    run = tmp_path / "cli"
    rc = main(["--config", str(REPO_ROOT / "configs" / "tiny_cpu.yaml"), f"run_dir={run}",
               f"model.student_checkpoint={assets['ckpt']}", f"data.path={assets['data']}", "steps=2",
               "logging.progress_bar=false", "curriculum.min_length=6", "curriculum.max_length=15"])
    assert rc == 0
    records = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1]
    # the curriculum's 6 and 10 tokens become whole blocks of 4 for the engine
    assert [r["rollout_len"] for r in records] == [4.0, 8.0]
    for key in ("loss", "kl", "teacher_nll", "committed_per_forward", "tokens_trained", "time/rollout",
                "time/teacher", "time/student", "time/optimizer", "lr", "grad_norm"):
        assert key in records[-1], key
    assert os.path.isdir(run / "checkpoints" / "step_00000002")


def test_tp2_and_pp2_match_tp1(assets, tmp_path):
    """Same replayed rollouts at TP=2 and at PP=2 (one torchrun launch): same losses and grad norms."""
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "tp1"), assets["data"], assets["ckpt"], steps=2,
                                                 micro_batch_size=1, checkpoint=dict(resume=False)))
    rec = RecordingRollout(naive_rollout)
    history = _train(cfg, rec)
    torch.save({"results": rec.results}, tmp_path / "rollouts.pt")
    out = tmp_path / "parallel.pt"
    run_torchrun("train_parallel.py", f"--ckpt={assets['ckpt']}", f"--data={assets['data']}",
                 f"--rollouts={tmp_path / 'rollouts.pt'}", f"--run-dir={tmp_path}", f"--out={out}")
    got = torch.load(out)
    for layout in ("tp2", "pp2"):
        for ref, res in zip(history, got[layout]):
            for key in ("loss", "teacher_nll", "grad_norm"):
                assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, ref["step"], key)
