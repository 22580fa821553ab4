"""OPD through Megatron-LM's real ``pretrain()`` (megatron/training from the megatron-core wheel, CPU/gloo).

The reference is the project's own ``Trainer`` at TP=1 on the same student, prompts, seeds and
schedule; ``pretrain()`` runs at TP=2 and at PP=2 under torchrun, and its per-iteration ``opd loss``
and ``grad norm`` (read from Megatron-LM's own log lines) must equal the reference's loss and
gradient norm. Also: flag validation (one line, exit code 2), the Megatron-LM checkpoint layout both
ways, resuming a ``pretrain()`` run from its own save, and the export of its checkpoint to HF.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.model.build import build_model
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.conftest import REPO_ROOT, run_torchrun
from tests.distributed.train_common import TINY_MODEL, tiny_train_dict, write_token_prompts
from tests.helpers import save_trainer_student

ENTRY = "../../examples/megatron_lm/pretrain_opd.py"
LR = 1e-3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    ckpt = save_trainer_student(root / "student")
    data = write_token_prompts(str(root / "prompts.jsonl"), num=6)
    opd = tiny_train_dict(str(root / "ref"), data, str(ckpt))
    for owned in ("train", "optim", "parallel", "checkpoint"):
        opd.pop(owned)
    opd_yaml = root / "opd.yaml"
    opd_yaml.write_text(yaml.safe_dump(opd))
    return dict(root=root, ckpt=str(ckpt), data=data, opd_yaml=str(opd_yaml))


def _megatron_flags(assets, iters=2, *extra, run_dir=None):
    run = ["--opd-run-dir", str(run_dir)] if run_dir else []
    return ["--opd-student", assets["ckpt"], "--opd-config", assets["opd_yaml"], *run,
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", str(iters),
            "--lr", str(LR), "--min-lr", str(LR), "--lr-decay-style", "constant", "--weight-decay", "0",
            "--clip-grad", "1.0", "--seed", "11", "--log-interval", "1", *extra]


def _iterations(stdout: str):
    """(iteration, opd loss, grad norm) as Megatron-LM's log lines print them (its first interval
    is not reset, so with --log-interval 1 iteration 2 shows the mean of iterations 1 and 2)."""
    out = []
    for line in stdout.splitlines():
        m = re.search(r"iteration\s+(\d+)/\s*\d+ .*\| opd loss: ([0-9.E+-]+) .*\| grad norm: ([0-9.]+)", line)
        if m:
            out.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    return out


def _steps(run_dir):
    """(iteration, loss, grad norm) per step from the plugin's metrics.jsonl (exact values)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(int(r["step"]) + 1, r["loss"], r["grad_norm"]) for r in records]


@pytest.fixture(scope="module")
def reference(assets):
    """The project's own trainer, TP=1, the same run."""
    from opdlm_megatron.training.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(
        str(assets["root"] / "own"), assets["data"], assets["ckpt"], train=dict(steps=2),
        optim=dict(lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, clip_grad=1.0),
        checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt)
        history = trainer.fit()
        trainer.close()
    return [(h["step"] + 1, h["loss"], h["grad_norm"]) for h in history]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,cp,sequence_parallel", [(2, 1, 1, True), (1, 2, 1, False), (1, 1, 2, False)])
def test_pretrain_matches_the_projects_trainer(assets, reference, tp, pp, cp, sequence_parallel, tmp_path):
    """TP=2 runs with Megatron-LM's --sequence-parallel (the resume test below runs TP=2 without); CP=2
    with --context-parallel-size 2 (each rank half of every row's columns)."""
    stdout = run_torchrun(ENTRY, *_megatron_flags(assets, 2, "--tensor-model-parallel-size", str(tp),
                                                   "--pipeline-model-parallel-size", str(pp),
                                                   "--context-parallel-size", str(cp),
                                                   *(["--sequence-parallel"] if sequence_parallel else []),
                                                   "--tensorboard-dir", str(tmp_path / "tb"), run_dir=tmp_path))
    got = _steps(tmp_path)
    assert [g[0] for g in got] == [1, 2], stdout[-3000:]
    # Megatron-LM's argument dump (the plugin's parallel.sequence_parallel is read from the same args)
    assert re.search(rf"sequence_parallel \.+ {sequence_parallel}\n", stdout), stdout[:3000]
    for (it, loss, norm), (ref_it, ref_loss, ref_norm) in zip(got, reference):
        assert it == ref_it
        assert loss == pytest.approx(ref_loss, rel=1e-4), (it, loss, ref_loss)
        assert norm == pytest.approx(ref_norm, rel=1e-4), (it, norm, ref_norm)
    assert reference[1][1] != pytest.approx(reference[0][1], rel=1e-3), "the first update changed nothing"
    # Megatron-LM's own log shows the same numbers (its first interval is not reset: 2 = mean of 1, 2)
    printed = _iterations(stdout)
    assert [p[0] for p in printed] == [1, 2]
    assert printed[0][1] == pytest.approx(got[0][1], rel=1e-5)
    assert printed[1][1] == pytest.approx((got[0][1] + got[1][1]) / 2, rel=1e-5)
    assert printed[1][2] == pytest.approx(got[1][2], abs=1e-3)
    # the rollout's numbers reach Megatron-LM's log like its own losses
    assert "opd committed per forward" in stdout and "opd rollout len" in stdout
    # and Megatron-LM's TensorBoard writer, per iteration (not averaged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    written = [(e.step, e.value) for e in events.Scalars("opd loss")]
    assert [w[0] for w in written] == [1, 2]
    assert [w[1] for w in written] == pytest.approx([g[1] for g in got], rel=1e-5)
    assert "opd rollout len" in events.Tags()["scalars"]


@pytest.mark.distributed
def test_pretrain_resumes_from_its_own_save_and_exports_to_hf(assets, reference, tmp_path):
    save, run = tmp_path / "run", tmp_path / "opd"
    # an interrupted run: the same schedule (2 iterations), stopped after the first (Megatron-LM's --exit-interval)
    run_torchrun(ENTRY, *_megatron_flags(assets, 2, "--tensor-model-parallel-size", "2", "--exit-interval", "1",
                                         "--save", str(save), "--save-interval", "1", run_dir=run))
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    second = run_torchrun(ENTRY, *_megatron_flags(assets, 2, "--tensor-model-parallel-size", "2", "--save", str(save),
                                                   "--load", str(save), "--save-interval", "1", run_dir=run))
    steps = _steps(run)
    assert [g[0] for g in steps] == [1, 2], second[-3000:]
    for (it, loss, norm), (_, ref_loss, ref_norm) in zip(steps, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-4), it
        assert norm == pytest.approx(ref_norm, rel=1e-4), it

    # the Megatron-LM checkpoint exports to HF (config + tokenizer-less weights) and reloads
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "opdlm_megatron.commands.convert_megatron_to_hf",
                           "--megatron-dir", str(save), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    with initialize_runtime(device="cpu", seed=1):
        from opdlm_megatron.checkpoint.megatron_lm import load_megatron_lm_model

        model = build_model(ModelConfig(**TINY_MODEL), "student")
        load_megatron_lm_model(model, str(save))
        qkv = model.decoder.layers[0].self_attention.linear_qkv.weight.detach()
    hf_q = hf.model.layers[0].self_attn.q_proj.weight.detach()
    # the trained weights, not the starting ones: the first query rows (head 0) match across layouts
    assert torch.allclose(qkv[: hf_q.shape[1] // TINY_MODEL["num_attention_heads"]],
                          hf_q[: hf_q.shape[1] // TINY_MODEL["num_attention_heads"]])


def test_checkpoint_layouts_round_trip(assets, tmp_path):
    from opdlm_megatron.checkpoint.megatron_lm import iteration_dir, load_megatron_lm_model, save_as_megatron_lm

    with initialize_runtime(device="cpu", seed=3):
        model, config = build_from_checkpoint(assets["ckpt"], "student")
        save_as_megatron_lm(model, config, str(tmp_path / "mlm"))
        assert iteration_dir(str(tmp_path / "mlm")).endswith("release")
        other = build_model(config, "student")
        load_megatron_lm_model(other, str(tmp_path / "mlm"))
        for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
        # and back: a Megatron-LM root is a valid --opd-student / build_from_checkpoint source
        back, back_config = build_from_checkpoint(str(tmp_path / "mlm"), "student")
        assert back_config.num_layers == config.num_layers
        assert torch.equal(back.decoder.layers[1].mlp.linear_fc1.weight, model.decoder.layers[1].mlp.linear_fc1.weight)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latest_checkpointed_iteration.txt").write_text("seven")
    with pytest.raises(ValueError, match="expected an iteration number or 'release'"):
        iteration_dir(str(tmp_path / "bad"))


@pytest.mark.parametrize("extra,message", [
    (["--hidden-size", "128"], "--hidden-size 128 (student: 64)"),
    (["--opd-threshold", "1.5"], "rollout.threshold must be in (0, 1]"),
    (["--opd-tasks-per-rollout", "3"], "rollout.tasks_per_rollout 3 is not a multiple of train.global_batch_size 2"),
    (["--calculate-per-token-loss"], "--calculate-per-token-loss"),
    (["--opd-mask-token-id", "999"], "--opd-mask-token-id 999 is outside the vocabulary"),
    (["--opd-set", "loss.divergence=l2"], "loss.divergence must be one of"),
])
def test_bad_flags_fail_with_one_line(assets, extra, message):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "megatron_lm" / "pretrain_opd.py"),
                           *_megatron_flags(assets, 1, *extra)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("opdlm-pretrain-megatron-lm: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_missing_student_fails_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "megatron_lm" / "pretrain_opd.py"),
                           "--opd-student", str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "checkpoint directory not found" in proc.stderr


def test_convert_layout_cli(assets, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "opdlm_megatron.commands.convert_layout", *args],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)

    mlm, back = tmp_path / "mlm", tmp_path / "back"
    assert cli("--src", assets["ckpt"], "--dst", str(mlm), "--to", "megatron-lm").returncode == 0
    assert (mlm / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert cli("--src", str(mlm), "--dst", str(back), "--to", "opdlm").returncode == 0
    with initialize_runtime(device="cpu", seed=3):
        original, _ = build_from_checkpoint(assets["ckpt"], "student")
        again, _ = build_from_checkpoint(str(back), "student")
        for (name, a), (_, b) in zip(original.state_dict().items(), again.state_dict().items()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
    for args, message in ((("--src", str(mlm), "--dst", str(tmp_path / "x"), "--to", "megatron-lm"), "already in the megatron-lm layout"),
                          (("--src", str(tmp_path / "none"), "--dst", str(tmp_path / "y"), "--to", "opdlm"), "is not a model checkpoint"),
                          (("--src", assets["ckpt"], "--dst", str(mlm), "--to", "megatron-lm"), "already exists")):
        proc = cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


@pytest.mark.distributed
def test_pretrained_checkpoint_in_megatron_lm_layout_starts_the_run(assets, reference, tmp_path):
    """A converted student in Megatron-LM's layout, loaded by pretrain() itself through
    --pretrained-checkpoint (finetune semantics), gives the same first step; the teacher is read
    from the same place."""
    from opdlm_megatron.tools.convert_layout import convert_layout

    root = tmp_path / "mlm"
    convert_layout(assets["ckpt"], str(root), "megatron-lm")
    # --opd-student points at the converted root as well: config and weights come from one place
    flags = _megatron_flags(assets, 2, "--pretrained-checkpoint", str(root), "--exit-interval", "1",
                            run_dir=tmp_path / "opd")
    flags[flags.index(assets["ckpt"])] = str(root)
    run_torchrun(ENTRY, *flags, nproc=1)
    (it, loss, norm), = _steps(tmp_path / "opd")
    assert it == 1
    assert loss == pytest.approx(reference[0][1], rel=1e-4)
    assert norm == pytest.approx(reference[0][2], rel=1e-4)


@pytest.mark.distributed
def test_quantization_aware_pretrain_matches_the_projects_trainer(assets, reference, tmp_path):
    """``quantization: {format: fp8}`` under Megatron-LM at TP 2: the student calibrated in model_provider on
    its own decoding, then trained fake-quantized, stopped after one iteration and resumed from its --save: the
    losses and gradient norms of the project's trainer at TP 1 with the same section; the run's --save
    describes a quantized student."""
    from opdlm_megatron.training.trainer import Trainer

    section = dict(format="fp8", calibration_prompts=3)
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "own"), assets["data"], assets["ckpt"], train=dict(steps=2), quantization=section,
        optim=dict(lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, clip_grad=1.0), checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt)
        quantized = [(h["step"] + 1, h["loss"], h["grad_norm"]) for h in trainer.fit()]
        trainer.close()
    # the same run unquantized (the module's reference) trains other numbers
    assert quantized[0][2] != pytest.approx(reference[0][2], rel=1e-4)
    opd = yaml.safe_load(open(assets["opd_yaml"]))
    opd["quantization"] = section
    opd_yaml = tmp_path / "opd_fp8.yaml"
    opd_yaml.write_text(yaml.safe_dump(opd))
    # interrupted after the first iteration (--exit-interval) and resumed with --load: the checkpoint brings the
    # ranges back over the resumed run's own calibration
    save = str(tmp_path / "save")
    flags = _megatron_flags(dict(assets, opd_yaml=str(opd_yaml)), 2, "--tensor-model-parallel-size", "2",
                            "--save", save, "--save-interval", "1", run_dir=tmp_path / "run")
    run_torchrun(ENTRY, *flags, "--exit-interval", "1")
    stdout = run_torchrun(ENTRY, *flags, "--load", save)
    assert re.search(r"successfully loaded checkpoint from .* at iteration 1", stdout), stdout[-3000:]
    got = _steps(tmp_path / "run")
    assert [g[0] for g in got] == [1, 2], stdout[-3000:]
    for (it, loss, norm), (_, ref_loss, ref_norm) in zip(got, quantized, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-4), it
        assert norm == pytest.approx(ref_norm, rel=1e-4), it
    assert ModelConfig.load(str(tmp_path / "save")).quantization == "fp8"
