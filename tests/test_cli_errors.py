"""Bad input to `opdlm-train` and `opdlm-generate`, as a new user would give it: one line naming the
bad value (``<program>: error: ...``), exit code 2, no traceback, nothing left in the output places."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import save_trainer_student
from tests.test_cli_hardening import _refused
from tests.distributed.train_common import write_token_prompts


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    ckpt = save_trainer_student(root / "ckpt")
    good = write_token_prompts(str(root / "prompts.jsonl"), num=4)
    (root / "broken.jsonl").write_text('{"prompt_ids": [5, 6]}\n{"prompt_ids": [7, \n')
    (root / "empty.jsonl").write_text("\n")
    (root / "text_prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (root / "broken.yaml").write_text("objective: opd\ntrain: [steps: 2\n")
    (root / "unknown_key.yaml").write_text("objective: opd\nlearning_rate: 0.1\n")
    _damaged_copies(root, ckpt)
    return dict(root=root, ckpt=str(ckpt), good=good)


def _damaged_copies(root, ckpt):
    """Checkpoints a user may hand in by mistake: a truncated weights shard, a trained block-diffusion
    student given as the teacher, a teacher with another vocabulary."""
    import shutil

    from opdlm_megatron.checkpoint.model import load_model_config, save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.checkpoint.training import write_manifest

    truncated = root / "truncated"
    shutil.copytree(ckpt, truncated)
    shard = max((p for p in truncated.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    student = root / "trained_student"
    shutil.copytree(ckpt, student)
    write_manifest(str(student), 40, "0", objective="opd")
    config = load_model_config(str(ckpt))
    with initialize_runtime(device="cpu", seed=4):
        other = config.replace(vocab_size=config.vocab_size + 6, padded_vocab=None, mask_token_id=None)
        save_model_checkpoint(build_model(other, "teacher"), str(root / "other_vocab"), other)


def _run(module, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("OPDLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)


def _assert_refused(proc, program, message):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{program}: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def _refused_in_process(main, args, program, message, capsys):
    """The command's ``main`` in this process (a fresh interpreter per case costs ~15 s of imports; one
    case per command goes through ``python -m`` to check the real process's exit code)."""
    capsys.readouterr()  # what the fixtures printed
    _refused(main, args, program, message, capsys)


# the cases that also run as a real process
THROUGH_PYTHON_M = {"train": "missing student", "generate": "missing prompts"}


TRAIN_CASES = {
    "missing config": (["--config", "nope.yaml"], "training config not found: nope.yaml"),
    "unknown key": (["optim.learning_rate=1"], "unknown optim config keys ['learning_rate']"),
    "unknown objective": (["objective=grpo"], "objective must be one of"),
    "threshold out of range": (["rollout.threshold=1.5"], "rollout.threshold must be in (0, 1]"),
    "negative temperature": (["rollout.temperature=-1"], "rollout.temperature must be >= 0"),
    "bad block size": (["block_size=0"], "block_size must be a positive integer"),
    "lengths reversed": (["curriculum.max_length=4"], "curriculum.max_length 4 is below curriculum.min_length 8"),
    "unknown divergence": (["loss.divergence=l1"], "loss.divergence must be one of"),
    "wrong type": (["train.steps=two"], "train.steps must be a positive integer"),
    "missing student": (["model.student_checkpoint={root}/none"], "checkpoint directory not found"),
    "malformed prompts": (["data.path={root}/broken.jsonl"], "broken.jsonl:2: invalid JSON"),
    "empty prompts": (["data.path={root}/empty.jsonl"], "empty.jsonl is empty"),
    "TP larger than the world": (["parallel.tensor_model_parallel_size=2"], "world size"),
    "CP larger than the world": (["parallel.context_parallel_size=2"], "world size"),
    "sequence parallelism without TP": (["parallel.sequence_parallel=true"],
                                        "parallel.sequence_parallel splits the sequence over the tensor-parallel "
                                        "ranks: it needs parallel.tensor_model_parallel_size > 1, got 1"),
    "fp8 on CPU": (["model.student_precision={{fp8: e4m3}}"], "student: FP8 needs the Transformer Engine layer spec"),
    "flex attention training on CPU": (["model.attention_backend=flex"],
                                       "attention_backend 'flex' trains only on CUDA GPUs"),
    "unknown attention backend": (["model.attention_backend=sdpa"], "model.attention_backend must be one of"),
    "malformed YAML": (["--config", "{root}/broken.yaml"], "broken.yaml is not valid YAML"),
    "unknown key in the config file": (["--config", "{root}/unknown_key.yaml"], "unknown config keys ['learning_rate']"),
    "negative length": (["curriculum.min_length=-5"], "curriculum.min_length must be a positive integer, got -5"),
    "unknown nan policy": (["nan_policy=ignore"], "nan_policy must be one of ['skip', 'stop'], got 'ignore'"),
    "prompt longer than the limit": (["data.max_prompt_tokens=2", "data.long_prompts=error"], "longer than"),
    "unknown lift weighting": (["objective=lift", "lift.weighting=uniform"], "lift.weighting must be one of"),
    "routing probability out of range": (["objective=opd_tcs", "tcs.route_prob=2"],
                                         "tcs.route_prob must be in (0, 1], got 2"),
    "truncated checkpoint": (["model.student_checkpoint={root}/truncated"], "is damaged"),
    "trained student as the teacher": (["model.teacher_checkpoint={root}/trained_student"],
                                       "is a block-diffusion student (trained with objective 'opd')"),
    "self-distillation from a trained student": (["model.student_checkpoint={root}/trained_student"],
                                                 "set model.teacher_checkpoint to the AR model"),
    "teacher with another vocabulary": (["model.teacher_checkpoint={root}/other_vocab"],
                                        "teacher vocab_size 256 != student vocab_size 250"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses(assets, case, capsys):
    from opdlm_megatron.commands import train

    extra, message = TRAIN_CASES[case]
    run_dir = assets["root"] / f"run-{case.replace(' ', '_')}"
    base = ["--config", str(REPO_ROOT / "configs" / "tiny_cpu.yaml"), f"model.student_checkpoint={assets['ckpt']}",
            f"data.path={assets['good']}", f"run_dir={run_dir}"]
    if extra[0] == "--config":
        base = [e.format(root=assets["root"]) for e in extra]
    else:
        base += [e.format(root=assets["root"]) for e in extra]
    if case == THROUGH_PYTHON_M["train"]:
        _assert_refused(_run("opdlm_megatron.train", *base), "opdlm-train", message)
    else:
        _refused_in_process(train.main, base, "opdlm-train", message, capsys)
    assert not run_dir.exists() or not any(run_dir.rglob("*")), "a refused run left files behind"


GENERATE_CASES = {
    "missing checkpoint": (["--checkpoint", "{root}/none"], "is not a model checkpoint"),
    "missing prompts": (["--prompts", "{root}/none.jsonl"], "not found"),
    "threshold out of range": (["--threshold", "0"], "threshold"),
    "bad batch size": (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    "negative temperature": (["--temperature", "-1"], "temperature"),
    "no new tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    "malformed prompts": (["--prompts", "{root}/broken.jsonl"], "broken.jsonl:2"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_refuses(assets, case, capsys):
    from opdlm_megatron.commands import generate

    extra, message = GENERATE_CASES[case]
    out = assets["root"] / f"gen-{case.replace(' ', '_')}.jsonl"
    args = {"--checkpoint": assets["ckpt"], "--prompts": str(assets["root"] / "text_prompts.jsonl"), "--out": str(out),
            "--tokenizer": str(assets["root"])}
    flags = []
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value.format(root=assets["root"])
    for flag, value in args.items():
        flags += [flag, value]
    if case == THROUGH_PYTHON_M["generate"]:
        _assert_refused(_run("opdlm_megatron.generate", *flags), "opdlm-generate", message)
    else:
        _refused_in_process(generate.main, flags, "opdlm-generate", message, capsys)
    assert not out.exists()


def _api_cases():
    """The Python API refuses the same kinds of mistakes with a ValueError / FileNotFoundError naming
    the bad value (the CLIs turn these into their one-line errors)."""
    import torch

    from opdlm_megatron.model import masks
    from opdlm_megatron.checkpoint.model import load_model_checkpoint
    from opdlm_megatron.model.losses import DivergenceConfig
    from opdlm_megatron.objectives import get_objective
    from opdlm_megatron.rollout.config import DecodeConfig
    from opdlm_megatron.distill.teacher import check_vocab_compatible
    from opdlm_megatron.model.microbatches import microbatch_rows
    from opdlm_megatron.training.config_files import train_config_from_dict
    from tests.helpers import tiny_config

    config = tiny_config()
    ids = torch.zeros(1, 3, dtype=torch.long)
    ok = torch.ones(1, 3, dtype=torch.bool)
    return {
        "decode threshold": (lambda: DecodeConfig(threshold=0), "DecodeConfig.threshold must lie in (0, 1], got 0"),
        "decode temperature": (lambda: DecodeConfig(temperature=-1), "DecodeConfig.temperature must be >= 0, got -1"),
        "decode block size": (lambda: DecodeConfig(block_size=0), "DecodeConfig.block_size must be a positive integer"),
        "divergence kind": (lambda: DivergenceConfig(kind="l1"), "unknown divergence kind 'l1'"),
        "jsd beta": (lambda: DivergenceConfig(kind="jsd", jsd_beta=1.0), "jsd_beta must lie strictly between 0 and 1"),
        "objective": (lambda: get_objective("grpo"), "unknown objective 'grpo'"),
        "vocabulary": (lambda: check_vocab_compatible(config.replace(vocab_size=300), config),
                       "teacher vocab_size 300 != student vocab_size"),
        "micro-batch size": (lambda: microbatch_rows(4, 0), "micro_batch_size must be a positive integer, got 0"),
        "config key": (lambda: train_config_from_dict({"optim": {"learning_rate": 1}}), "unknown optim config keys"),
        "answer shapes": (lambda: masks.opd_training_batch(ids, ok, ids, ids[:, :2], ok, 4), "must have one shape"),
        "not a checkpoint": (lambda: load_model_checkpoint(None, "/nonexistent"), "is not an opdlm-megatron checkpoint"),
    }


@pytest.mark.parametrize("case", sorted(_api_cases()))
def test_python_api_refuses(case):
    call, message = _api_cases()[case]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        call()
    assert message in str(info.value)
