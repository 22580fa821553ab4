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
from tests.distributed.train_common import write_token_prompts


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    ckpt = save_trainer_student(root / "ckpt")
    good = write_token_prompts(str(root / "prompts.jsonl"), num=4)
    (root / "broken.jsonl").write_text('{"prompt_ids": [5, 6]}\n{"prompt_ids": [7, \n')
    (root / "empty.jsonl").write_text("\n")
    (root / "text_prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    return dict(root=root, ckpt=str(ckpt), good=good)


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
    "fp8 on CPU": (["model.student_precision={{fp8: e4m3}}"], "student: FP8 needs the Transformer Engine layer spec"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses(assets, case):
    extra, message = TRAIN_CASES[case]
    run_dir = assets["root"] / f"run-{case.replace(' ', '_')}"
    base = ["--config", str(REPO_ROOT / "configs" / "tiny_cpu.yaml"), f"model.student_checkpoint={assets['ckpt']}",
            f"data.path={assets['good']}", f"run_dir={run_dir}"]
    if extra[0] == "--config":
        base = extra
    else:
        base += [e.format(root=assets["root"]) for e in extra]
    _assert_refused(_run("opdlm_megatron.train", *base), "opdlm-train", message)
    assert not run_dir.exists() or not any(run_dir.rglob("*")), "a refused run left files behind"


GENERATE_CASES = {
    "missing checkpoint": (["--checkpoint", "{root}/none"], "is not a model checkpoint"),
    "missing prompts": (["--prompts", "{root}/none.jsonl"], "not found"),
    "threshold out of range": (["--threshold", "0"], "threshold"),
    "bad batch size": (["--batch-size", "0"], "--batch-size must be positive, got 0"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_refuses(assets, case):
    extra, message = GENERATE_CASES[case]
    out = assets["root"] / f"gen-{case.replace(' ', '_')}.jsonl"
    args = {"--checkpoint": assets["ckpt"], "--prompts": str(assets["root"] / "text_prompts.jsonl"), "--out": str(out),
            "--tokenizer": str(assets["root"])}
    flags = []
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value.format(root=assets["root"])
    for flag, value in args.items():
        flags += [flag, value]
    _assert_refused(_run("opdlm_megatron.generate", *flags), "opdlm-generate", message)
    assert not out.exists()
