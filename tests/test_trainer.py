"""The OPD training loop on a tiny model (CPU, real megatron-core DDP/optimizer/schedules)."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron.model import masks
from opdlm_megatron.checkpoint.model import load_model_checkpoint, save_model_checkpoint
from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.training.metrics import read_metrics
from opdlm_megatron.model.build import build_model
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
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
    from opdlm_megatron.training.trainer import Trainer

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


def _dense_opd_loss(student, teacher, config, result, xt, eot_ids, normalization="token"):
    """Independent reference: full-vocabulary forward KL over the masked xt tokens, float64; summed
    and divided by their number ("token"), or averaged per row and then over rows ("row")."""
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
            p_log = F.log_softmax(t_logits[i, P + a - 1].double(), -1)
            q_log = F.log_softmax(s_logits[i, batch.prediction_columns[i, a]].double(), -1)
            per_tok.append(F.kl_div(q_log, p_log, log_target=True, reduction="sum"))
        if per_tok:
            rows.append(torch.stack(per_tok))
    if normalization == "token":
        return float(torch.cat(rows).sum() / sum(len(r) for r in rows))
    return float(torch.stack([r.mean() for r in rows]).mean())


def test_opd_steps_decrease_loss_teacher_frozen_and_absent_from_checkpoint(assets, tmp_path):
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "run"), assets["data2"], assets["ckpt"], train=dict(steps=6),
        data=dict(shuffle=False), optim=dict(lr=3e-3, min_lr=3e-3, warmup_steps=0),
        curriculum=dict(min_length=8, max_length=8, warmup_rollouts=1)))
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


@pytest.mark.parametrize("normalization", ["token", "row"])
def test_step_loss_matches_dense_reference(assets, tmp_path, normalization):
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=1), checkpoint=dict(resume=False),
                                                 loss=dict(normalization=normalization, state_selection="trajectory")))
    from opdlm_megatron.distill import states
    from opdlm_megatron.training.trainer import Trainer

    rec = RecordingRollout(naive_rollout)
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rec)
        student0 = build_model(trainer.config, "student")
        student0.load_state_dict(trainer.student.state_dict(), strict=False)
        metrics = trainer.train_step()
        result = rec.results[0]
        xt = states.select_states(result, "trajectory", trainer.data._step_generator(0), trainer.config.mask_token_id,
                                  block_size=trainer.config.block_size)
        ref = _dense_opd_loss(student0.eval(), trainer.teacher.model, trainer.config, result, xt,
                              trainer.config.eos_token_ids, normalization)
        trainer.close()
    assert metrics["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("normalization,pack_states", [("token", True), ("row", True), ("token", False)])
def test_all_rounds_loss_matches_dense_reference_of_each_state_alone(assets, tmp_path, normalization, pack_states):
    """loss.state_selection=all_rounds: every round of every block is a row (built here by the authors'
    round loop, token by token), each scored alone by the dense float64 reference; the step's loss is
    theirs, with the teacher run once per answer and 2 answers per step cut into micro-batches of one -
    the student forwarding the states of an answer packed into one row (loss.pack_states) or one row each."""
    from opdlm_megatron.training.trainer import Trainer
    from tests.distributed.student_data import authors_rounds

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=1), checkpoint=dict(resume=False),
                                                 rollout=dict(threshold=0.2),
                                                 loss=dict(normalization=normalization, state_selection="all_rounds",
                                                           pack_states=pack_states)))
    rec = RecordingRollout(naive_rollout)
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rec)
        student0 = build_model(trainer.config, "student")
        student0.load_state_dict(trainer.student.state_dict(), strict=False)
        metrics = trainer.train_step()
        result = rec.results[0]
        mask_id, eos = trainer.config.mask_token_id, trainer.config.eos_token_ids
        source, states = [], []
        for b in range(result.batch_size):
            keep = torch.ones_like(result.answer_valid[b])  # the reference drops after-EOS tokens itself
            rows = authors_rounds(result.answer_ids[b], result.answer_valid[b], result.commit_step[b],
                                  trainer.config.block_size, keep, mask_id)
            source += [b] * len(rows)
            states += rows
        expanded = result.rows(torch.tensor(source), trim=False)
        ref = _dense_opd_loss(student0.eval(), trainer.teacher.model, trainer.config, expanded,
                              torch.tensor(states), eos, normalization)
        trainer.close()
    assert len(source) > result.batch_size, "the rollout should give several rounds per answer"
    assert metrics["rows_per_answer"] == pytest.approx(len(source) / result.batch_size)
    assert metrics["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_threshold_schedule_reaches_the_rollouts_and_the_log(assets, tmp_path):
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "run"), assets["data"], assets["ckpt"], train=dict(steps=4), checkpoint=dict(resume=False),
        rollout=dict(threshold=0.9, threshold_schedule=dict(final=0.5, hold_rollouts=1, ramp_rollouts=2))))
    seen = []

    def rollout(model, config, prompts, decode):
        seen.append(decode.threshold)
        return naive_rollout(model, config, prompts, decode)

    history = _train(cfg, rollout)
    assert seen == pytest.approx([0.9, 0.9, 0.7, 0.5])  # one rollout per step here (2 tasks, batch 2)
    assert [h["rollout_threshold"] for h in history] == pytest.approx(seen)
    logged = read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert [r["rollout_threshold"] for r in logged] == pytest.approx(seen)


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_interrupt_and_resume_gives_identical_losses(assets, tmp_path, stop_at):
    """4 tasks per rollout, batch 2: two optimizer steps per rollout. A stop after step 1 or 3 falls
    inside a rollout (its buffer is saved), a stop after step 2 between rollouts."""
    common = dict(train=dict(steps=4), rollout=dict(tasks_per_rollout=4, threshold=0.5, temperature=1.0),
                  optim=dict(lr=2e-3, min_lr=2e-4, warmup_steps=2),
                  curriculum=dict(min_length=4, max_length=12, warmup_rollouts=1))
    full = _train(train_config_from_dict(tiny_train_dict(str(tmp_path / "a"), assets["data"], assets["ckpt"], **common)))
    cfg_b = train_config_from_dict(tiny_train_dict(str(tmp_path / "b"), assets["data"], assets["ckpt"], **common))
    first = _train(cfg_b, until=stop_at)
    saved = os.path.join(cfg_b.checkpoint_dir, f"step_{stop_at:08d}")
    assert os.path.isdir(saved)
    assert os.path.isfile(os.path.join(saved, "rollout_buffer.safetensors")) == (stop_at % 2 == 1)
    # a kill after the checkpoint loses a step that was already logged: the resumed run redoes it
    # and metrics.jsonl keeps each step once
    log_b = os.path.join(cfg_b.run_dir, "metrics.jsonl")
    with open(log_b, "a") as f:
        f.write(json.dumps({"step": stop_at, "loss": -1.0}) + "\n")
    rest = _train(cfg_b)
    logged = read_metrics(log_b)
    assert [r["step"] for r in logged] == [r["step"] for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl"))]
    assert [r["loss"] for r in logged] == [h["loss"] for h in first + rest]
    assert [h["step"] for h in rest] == list(range(stop_at, 4))
    for a, b in zip(full, first + rest):
        for key in ("loss", "lr", "rollout", "rollout_len", "tokens_trained", "paper_tokens_total", "teacher_nll",
                    "grad_norm", "epoch"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert [h["rollout"] for h in full] == [0, 0, 1, 1]
    assert [h["rollout_len"] for h in full] == [4, 4, 12, 12]  # the curriculum advances per rollout


def test_tensorboard_holds_the_jsonl_numbers_once_per_step_after_a_resume(assets, tmp_path):
    """The TensorBoard scalars equal metrics.jsonl; a kill after the step-2 checkpoint left events of
    steps 2 and 3 behind (written here by hand), and the resumed run's purge step drops them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                 logging=dict(tensorboard=True)))
    first = _train(cfg, until=2)
    leftover = SummaryWriter(log_dir=os.path.join(cfg.run_dir, "tensorboard"))
    for step in (2, 3):
        leftover.add_scalar("loss", -1.0, step)
    leftover.close()
    rest = _train(cfg)
    events = EventAccumulator(os.path.join(cfg.run_dir, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in logged] == [0, 1, 2, 3]
    for key in ("loss", "kl", "grad_norm", "lr", "rollout_len", "tokens_trained", "time/rollout"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [0, 1, 2, 3], key
        # TensorBoard stores float32
        assert [e.value for e in scalars] == pytest.approx([float(r[key]) for r in logged], rel=1e-6), key
    assert [h["loss"] for h in first + rest] == [r["loss"] for r in logged]
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_teacher_kernel_follows_the_objective_and_changes_no_number(assets, tmp_path):
    """An OPD teacher only scores answers: it runs megatron's causal mask type (TE's fused causal attention
    on GPUs) and the run's losses and gradient norms equal those with the arbitrary mask; objectives
    whose teacher decodes answers (kd_off) or scores TCS branches (opd_tcs) keep the arbitrary mask."""
    from megatron.core.transformer.enums import AttnMaskType

    kernels = {}

    def kernel_of(key):
        def inspect(trainer, when):
            kernels[key] = trainer.teacher.model.opd_attn_mask_type
        return inspect

    runs = {}
    for causal in (True, False):
        cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / f"opd_{causal}"), assets["data"], assets["ckpt"],
                                                     train=dict(steps=2), model=dict(teacher_causal_kernel=causal)))
        runs[causal] = _train(cfg, inspect=kernel_of(("opd", causal)))
    assert kernels[("opd", True)] == AttnMaskType.causal and kernels[("opd", False)] == AttnMaskType.arbitrary
    for a, b in zip(runs[True], runs[False]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["teacher_nll"] == pytest.approx(b["teacher_nll"], rel=1e-6)
    for objective in ("kd_off", "opd_tcs"):
        cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / objective), assets["data"], assets["ckpt"],
                                                     objective=objective, train=dict(steps=1)))
        _train(cfg, until=0, inspect=kernel_of(objective))
        assert kernels[objective] == AttnMaskType.arbitrary, objective


def test_first_layout_checkpoint_resumes(assets, tmp_path):
    """A checkpoint whose trainer state has the first layout (one rollout per step, no format key)."""
    from opdlm_megatron.checkpoint.training import save_training_checkpoint
    from opdlm_megatron.training.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "old"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=3)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        trainer.train_step()
        legacy_state = {"step": 1, "data": trainer.data.stream.state_dict(), "scheduler": trainer.lr_schedule.state_dict(),
                        "rollout_length": 8, "tokens_trained": 5.0, "objective": "opd", "seed": cfg.seed}
        save_training_checkpoint(cfg.checkpoint_dir, 1, trainer.student, trainer.optimizer, trainer.config,
                                 legacy_state)
        trainer.close()
    history = _train(cfg)
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["rollout"] == 1 and history[0]["tokens_trained"] == 5.0 + history[0]["tokens"]


def test_nan_loss_is_skipped_or_stops_the_run(assets, tmp_path):
    from opdlm_megatron.training.trainer import NonFiniteLossError, Trainer

    def poison_step(trainer, step):
        def hook(module, args, output):
            if torch.is_grad_enabled() and trainer.step_under_test == step:
                return output * float("nan")
            return output
        trainer.student.register_forward_hook(hook)

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "skip"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=3), checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        poison_step(trainer, 1)
        records = []
        for step in range(3):
            trainer.step_under_test = step
            before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
            records.append(trainer.train_step())
            unchanged = all(torch.equal(v, dict(trainer.student.named_parameters())[k]) for k, v in before.items())
            assert unchanged == (step == 1), step
        trainer.close()
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"])
    # a skipped step counts no tokens
    assert records[1]["paper_tokens"] == 0 and records[1]["paper_tokens_total"] == records[0]["paper_tokens_total"]
    assert records[1]["tokens_trained"] == records[0]["tokens_trained"]

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "stop"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=3), nan_policy="stop", checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        poison_step(trainer, 0)
        trainer.step_under_test = 0
        with pytest.raises(NonFiniteLossError, match="step 0: non-finite loss nan"):
            trainer.train_step()
        trainer.close()


@pytest.mark.parametrize("objective", ["opd_off", "kd_off", "sft", "mdlm", "ar", "tcs", "lift2"])
def test_other_objectives_train(assets, tmp_path, objective):
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / objective), assets["data2"], assets["ckpt"], objective=objective, train=dict(steps=4),
        data=dict(shuffle=False), optim=dict(lr=3e-3, min_lr=3e-3, warmup_steps=0),
        curriculum=dict(min_length=8, max_length=8, warmup_rollouts=1)))
    history = _train(cfg)
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    assert losses[-1] < losses[0], losses
    if objective in ("mdlm", "ar", "sft", "kd_off", "tcs", "lift2"):
        assert math.isnan(history[0]["rollout_len"])
    else:
        assert history[0]["rollout_len"] == 8


def test_cli_entry_point_with_rollout_engine(assets, tmp_path):
    """``python -m opdlm_megatron.train --config configs/tiny_cpu.yaml`` with the real engine."""
    from opdlm_megatron.train import main

    run = tmp_path / "cli"
    rc = main(["--config", str(REPO_ROOT / "configs" / "tiny_cpu.yaml"), f"run_dir={run}",
               f"model.student_checkpoint={assets['ckpt']}", f"data.path={assets['data']}", "train.steps=2",
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


def _against_tp1(assets, tmp_path, objectives, layouts, overrides=(), nproc=2):
    """``(histories, got)``: each objective trained 2 steps at TP=1 in-process (its rollouts recorded), then
    at ``layouts`` (train_parallel.py's names) in one torchrun launch replaying those rollouts."""
    histories, recorded = {}, {}
    for objective in objectives:
        cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / objective), assets["data"], assets["ckpt"],
                                                     objective=objective, train=dict(steps=2),
                                                     checkpoint=dict(resume=False)), list(overrides))
        rec = RecordingRollout(naive_rollout)
        histories[objective] = _train(cfg, rec)
        recorded[objective] = rec.results
    torch.save(recorded, tmp_path / "rollouts.pt")
    out = tmp_path / "parallel.pt"
    run_torchrun("train_parallel.py", f"--ckpt={assets['ckpt']}", f"--data={assets['data']}",
                 f"--rollouts={tmp_path / 'rollouts.pt'}", f"--run-dir={tmp_path}", f"--out={out}",
                 f"--objectives={','.join(objectives)}", f"--layouts={','.join(layouts)}",
                 *(f"--override={o}" for o in overrides), nproc=nproc)
    return histories, torch.load(out)


def _name(objective, layout):
    return layout if objective == "opd" else f"{objective}/{layout}"


def test_tp2_and_pp2_match_tp1(assets, tmp_path):
    """Same replayed rollouts at TP=2, TP=2 with sequence parallelism and PP=2 (one torchrun launch):
    same losses and grad norms as TP=1; with SP the same as without it to rel 1e-5 (the student's and
    the teacher's rows padded to whole TP shares, the norms' gradients reduced over TP)."""
    histories, got = _against_tp1(assets, tmp_path, ["opd"], ["tp2", "tp2sp", "pp2"])
    assert got["sequence_parallel/opd/tp2sp"] == [(True, True), (True, True)]  # student, teacher
    assert got["sequence_parallel/opd/tp2"] == [(False, False), (False, False)]
    for layout in ("tp2", "tp2sp", "pp2"):
        for ref, res in zip(histories["opd"], got[layout], strict=True):
            for key in ("loss", "teacher_nll", "grad_norm"):
                assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, ref["step"], key)
    for ref, res in zip(got["tp2"], got["tp2sp"], strict=True):
        for key in ("loss", "teacher_nll", "grad_norm"):
            assert res[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), ("tp2sp vs tp2", ref["step"], key)


def _after_adam(step: int, rel: float) -> float:
    """The tolerance of a layout comparison at ``step``: ``rel`` for the first step (same weights, only
    the layout's summation order between them), at least 1e-4 after an optimizer step. A CP rank
    multiplies half of the queries, a matmul of another shape, whose last bits depend on the BLAS
    kernel (on AVX-512 machines they differ), and Adam's normalised update moves a near-zero-gradient
    weight by lr whatever those bits (measured: step-1 loss 3.8e-5 relative at CP=2 on an AMD EPYC)."""
    return rel if step == 0 else max(rel, 1e-4)


def test_context_parallel_matches_tp1(assets, tmp_path):
    """CP=2: each rank forwards a zigzag half of every training row, keys and values gathered over the
    pair. Every objective trains 3 steps as at TP=1: losses and gradient norms of the first step and the
    final weights to rel 1e-5 (keys gathered back into column order, so attention sums in the same
    order), of later steps to 1e-4 (``_after_adam``)."""
    from opdlm_megatron.checkpoint.model import build_from_checkpoint

    objectives = ("opd", "mdlm", "opd_tcs", "lift", "sft")  # (all ten measured alike, 2026-12-03)
    histories, got = _against_tp1(assets, tmp_path, objectives, ["cp2"], ["tcs.route_prob=0.5", "train.steps=3"])
    for objective in objectives:
        attended = got[f"attended/{objective}/cp2"]  # (queries, keys) of the training forwards
        assert attended and all(keys == 2 * queries for queries, keys in attended), (objective, attended)
        assert [h["step"] for h in histories[objective]] == [0, 1, 2]
        for ref, res in zip(histories[objective], got[_name(objective, "cp2")], strict=True):
            for key in ("loss", "grad_norm"):
                rel = _after_adam(ref["step"], 1e-5)
                assert res[key] == pytest.approx(ref[key], rel=rel, abs=1e-7), (objective, ref["step"], key)
    with initialize_runtime(device="cpu"):
        for objective in ("opd", "mdlm"):
            ref, _ = build_from_checkpoint(str(tmp_path / objective / "checkpoints" / "step_00000003"), "student")
            res, _ = build_from_checkpoint(str(tmp_path / f"{objective}_cp2" / "checkpoints" / "step_00000003"), "student")
            for (name, a), (_, b) in zip(ref.named_parameters(), res.named_parameters(), strict=True):
                # per tensor, relative to its norm (Adam's normalised steps move a near-zero-gradient
                # element by lr whatever its gradient's last bits; measured: max 2.6e-7 absolute)
                assert float((b - a).norm() / a.norm()) < 1e-5, (objective, name, (b - a).abs().max())


@pytest.mark.distributed
def test_four_rank_layouts_match_tp1(assets, tmp_path):
    """4 ranks (on this machine's 2 cores), one launch: TP=2 x PP=2 with sequence parallelism (the
    pipeline hands on each stage's sequence share), TP=2 with SP x CP=2 (each CP rank's columns split
    again over TP), and PP=2 x CP=2 (the stages hand on each CP rank's columns)."""
    histories, got = _against_tp1(assets, tmp_path, ["opd"], ["tp2pp2sp", "tp2spcp2", "pp2cp2"], nproc=4)
    assert got["sequence_parallel/opd/tp2pp2sp"][0] == got["sequence_parallel/opd/tp2spcp2"][0] == (True, True)
    # TP's all-reduces sum in another order than one rank (the TP tests' 1e-4); CP and PP keep 1e-5
    for layout, rel in (("tp2pp2sp", 1e-4), ("tp2spcp2", 1e-4), ("pp2cp2", 1e-5)):
        for ref, res in zip(histories["opd"], got[layout], strict=True):
            for key in ("loss", "teacher_nll", "grad_norm"):
                tol = _after_adam(ref["step"], rel)
                assert res[key] == pytest.approx(ref[key], rel=tol, abs=1e-7), (layout, ref["step"], key)


@pytest.mark.distributed
def test_dp2_training_matches_dp1(assets, tmp_path):
    """Data parallelism changes nothing: rollouts are split over the ranks and gathered (sampling
    keyed by global row), one rollout length for all ranks, states drawn on the global batch, the
    loss normalised over the global batch, gradients reduced by megatron DDP (also with the
    distributed optimizer), and a checkpoint taken inside a rollout resumes exactly. Context
    parallelism 2 changes nothing either (the same launch): real engine rollouts, decoded alike on
    both ranks, and half of every row's columns trained on each."""
    import json

    data = tiny_train_dict(str(tmp_path / "dp1"), assets["data"], assets["ckpt"], train=dict(steps=4),
                           rollout=dict(tasks_per_rollout=4, threshold=0.7, temperature=1.0),
                           curriculum=dict(min_length=4, max_length=12, warmup_rollouts=1),
                           optim=dict(lr=2e-3, min_lr=2e-4, warmup_steps=1))
    reference = _train(train_config_from_dict(data), rollout_fn=None)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(data))
    out = tmp_path / "dp2.pt"
    run_torchrun("train_dp.py", f"--config={config_file}", f"--run-dir={tmp_path / 'dp2'}", f"--out={out}")
    got = torch.load(out, weights_only=False)
    for name in ("straight", "resumed", "cp2"):
        assert [h["step"] for h in got[name]] == [0, 1, 2, 3], name
        for ref, res in zip(reference, got[name]):
            for key in ("rollout_len", "tokens", "paper_tokens", "answer_tokens", "committed_per_forward"):
                assert res[key] == ref[key], (name, ref["step"], key)
            for key in ("loss", "teacher_nll", "grad_norm"):
                assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), (name, ref["step"], key)


def test_nan_gradients_with_a_finite_loss_skip_the_update(assets, tmp_path):
    """An overflow in backward can leave NaN gradients behind a finite loss; megatron's optimizer would
    apply them. The step is skipped instead: weights and Adam state untouched, training goes on."""
    from opdlm_megatron.training.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], assets["ckpt"],
                                                 train=dict(steps=3), checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        weight = trainer.student.decoder.layers[0].mlp.linear_fc1.weight
        poison = {"on": False}
        weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
        records = []
        for step in range(3):
            poison["on"] = step == 1
            weights = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
            adam = {id(p): {k: t.clone() for k, t in s.items() if torch.is_tensor(t)}
                    for p, s in trainer.optimizer.optimizer.state.items()}
            records.append(trainer.train_step())
            if step == 1:
                assert all(torch.equal(v, dict(trainer.student.named_parameters())[k]) for k, v in weights.items())
                after = {id(p): s for p, s in trainer.optimizer.optimizer.state.items()}
                assert all(torch.equal(t, after[i][k]) for i, s in adam.items() for k, t in s.items())
        trainer.close()
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0]
    assert math.isfinite(records[1]["loss"]) and math.isfinite(records[2]["loss"])
    assert all(math.isfinite(r["grad_norm"]) for r in (records[0], records[2]))


def test_tcs_and_lift_tp2_and_pp2_match_tp1(assets, tmp_path):
    """opd_tcs (student scorer routing, teacher branches) and lift (student scorer selection) train
    alike at TP=2 (also with sequence parallelism) and PP=2 (one torchrun launch) as at TP=1: same
    losses, grad norms and TCS routing."""
    objectives = ("opd_tcs", "lift")
    histories, got = _against_tp1(assets, tmp_path, objectives, ["tp2", "tp2sp", "pp2"],
                                  ["tcs.route_prob=0.5"])  # enough routed positions in two small steps
    assert all(h["tcs_routed_share"] > 0 for h in histories["opd_tcs"])
    for objective in objectives:
        keys = ["loss", "grad_norm"] + (["tcs_routed_share", "tcs_disagree_share"] if objective == "opd_tcs" else [])
        for layout in ("tp2", "tp2sp", "pp2"):
            for ref, res in zip(histories[objective], got[_name(objective, layout)], strict=True):
                for key in keys:
                    assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (objective, layout, ref["step"], key)


def test_other_objectives_with_sequence_parallelism_match_tp1(assets, tmp_path):
    """mdlm, sft, ar, kd_off, opd_off and lift2 (text, cached-answer and rollout objectives; opd, opd_tcs and
    lift are in the tests above) train at TP=2 with sequence parallelism as at TP=1 (one torchrun launch)."""
    objectives = ("mdlm", "sft", "ar", "kd_off", "opd_off", "lift2")
    histories, got = _against_tp1(assets, tmp_path, objectives, ["tp2sp"])
    for objective in objectives:
        assert all(sp for sp, _ in got[f"sequence_parallel/{objective}/tp2sp"]), objective
        for ref, res in zip(histories[objective], got[_name(objective, "tp2sp")], strict=True):
            assert math.isfinite(ref["loss"]) and ref["loss"] > 0, objective
            for key in ("loss", "grad_norm"):
                assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (objective, ref["step"], key)


def test_all_rounds_tp2_pp2_and_cp2_match_tp1(assets, tmp_path):
    """loss.state_selection=all_rounds for opd and opd_tcs at TP=2, PP=2 and CP=2 (one torchrun launch) as
    at TP=1: the packed rows (loss.pack_states) at one width under PP and split over the CP ranks, cut
    per micro-batch at TP=1."""
    objectives = ("opd", "opd_tcs")
    histories, got = _against_tp1(assets, tmp_path, objectives, ["tp2", "pp2", "cp2"],
                                  ["loss.state_selection=all_rounds", "tcs.route_prob=0.5", "rollout.threshold=0.3"])
    assert all(h["rows_per_answer"] > 1 for h in histories["opd"])
    for objective in objectives:
        for layout in ("tp2", "pp2", "cp2"):
            for ref, res in zip(histories[objective], got[_name(objective, layout)], strict=True):
                for key in ("loss", "grad_norm", "rows_per_answer", "teacher_nll"):
                    assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (objective, layout, ref["step"], key)


def test_nan_teacher_logits_skip_the_step_and_the_next_checkpoint_resumes_exactly(assets, tmp_path):
    """NaN in the teacher's targets of step 1 (a test hook on FrozenTeacher.targets): that step is
    reported skipped with the weights untouched, training goes on, and a run stopped after step 2
    resumes from its checkpoint to the same losses and grad norms as the uninterrupted run."""
    common = dict(train=dict(steps=4), checkpoint=dict(save_every=1, resume=True))
    poisoned_steps = {1}

    def inspect(trainer, when):
        if when != "before":
            return
        original = trainer.teacher.targets

        def targets(*args, **kwargs):
            out = original(*args, **kwargs)
            if trainer.step in poisoned_steps and out.logits is not None:
                out.logits.fill_(float("nan"))
            return out
        trainer.teacher.targets = targets
        weights = {}
        step = trainer.train_step

        def checked_step():
            index = trainer.step
            weights.update({k: v.detach().clone() for k, v in trainer.student.named_parameters()})
            record = step()
            same = all(torch.equal(v, dict(trainer.student.named_parameters())[k]) for k, v in weights.items())
            assert same == (index in poisoned_steps), index
            return record
        trainer.train_step = checked_step

    full = _train(train_config_from_dict(tiny_train_dict(str(tmp_path / "a"), assets["data"], assets["ckpt"],
                                                         **common)), inspect=inspect)
    assert [h["skipped"] for h in full] == [0.0, 1.0, 0.0, 0.0]
    assert math.isnan(full[1]["loss"]) and all(math.isfinite(h["loss"]) for h in full[2:])
    cfg_b = train_config_from_dict(tiny_train_dict(str(tmp_path / "b"), assets["data"], assets["ckpt"], **common))
    first = _train(cfg_b, until=2, inspect=inspect)
    rest = _train(cfg_b, inspect=inspect)
    assert [h["step"] for h in rest] == [2, 3]
    for a, b in zip(full[2:], rest):
        for key in ("loss", "grad_norm", "lr", "teacher_nll"):
            assert a[key] == b[key], (a["step"], key)
    assert [h["skipped"] for h in first] == [0.0, 1.0]


def test_loss_spike_detector():
    from opdlm_megatron.training.metrics import LossSpikeDetector

    detector = LossSpikeDetector(factor=3.0, window=5, min_history=3)
    flags = [detector.update(x) for x in [1.0, 1.2, 9.0, 0.9, 1.1, float("nan"), 3.5, 1.0, 2.0, 7.0]]
    # 9.0 comes before 3 losses are known; NaN is ignored; 3.5 > 3 x median(1.0, 1.2, 9.0, 0.9, 1.1) = 3.3;
    # 7.0 > 3 x median(0.9, 1.1, 3.5, 1.0, 2.0) = 3.3
    assert flags == [False, False, False, False, False, False, True, False, False, True]
    assert detector.history == [1.1, 3.5, 1.0, 2.0, 7.0]
    restored = LossSpikeDetector(factor=3.0, window=5, min_history=3)
    restored.load_state_dict(detector.state_dict())
    assert restored.update(50.0) and detector.update(50.0)
    assert not LossSpikeDetector(factor=0.0, min_history=0).update(1e9)
