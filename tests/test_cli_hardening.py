"""The second hardening round (a new user's probe): every command refuses, before it touches anything,
an output that would destroy an input or cannot be written; one writer per run directory; no
traceback for malformed configs; silent changes said once on the console; a quiet, fast screen; the
planner from a HF config alone. Each refusal: one line ``<console script>: error: ...``, exit code 2,
nothing written or deleted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.distributed.convert_common import make_tiny_hf
from tests.distributed.train_common import write_token_prompts
from tests.helpers import save_trainer_student


# ------------------------------------------------------------------------------------ helpers
def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("OPDLM_DEBUG", None)
    return env


def _run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=REPO_ROOT, timeout=timeout)


def _refused(main, args, program, message, capsys):
    """Runs a command's ``main`` in-process (fast) and checks the one-line refusal."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{program}: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert all(line.startswith(f"{program}: ") for line in lines), err  # the project's lines only
    return errors[0]


def _snapshot(path):
    """Every file under ``path`` with its content hash (to prove nothing was written or deleted)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    ckpt = save_trainer_student(root / "ckpt")
    prompts = write_token_prompts(str(root / "prompts.jsonl"), num=4)
    hf = root / "hf"
    make_tiny_hf("llama_mha_tied", str(hf))
    return dict(root=root, ckpt=str(ckpt), prompts=prompts, hf=str(hf))


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


# -------------------------------------------------------------------- 1. destroying the input
def test_converters_refuse_an_output_that_is_contains_or_lies_inside_the_input(assets, tmp_path, capsys):
    from opdlm_megatron.commands import convert_hf_to_megatron, convert_layout, convert_megatron_to_hf

    ckpt = _copy(assets["ckpt"], tmp_path / "x")
    hf = _copy(assets["hf"], tmp_path / "h")
    os.symlink(ckpt, tmp_path / "link")
    before = {p: _snapshot(p) for p in (ckpt, hf)}
    cases = [
        (convert_megatron_to_hf.main, ["--megatron-dir", ckpt, "--out", ckpt, "--overwrite"],
         "opdlm-convert-megatron-to-hf", f"--out {ckpt} is --megatron-dir {ckpt}"),
        (convert_megatron_to_hf.main, ["--megatron-dir", ckpt, "--out", tmp_path / "link", "--overwrite"],
         "opdlm-convert-megatron-to-hf", "is --megatron-dir"),  # a symlink to the input
        (convert_megatron_to_hf.main, ["--megatron-dir", ckpt, "--out", f"{ckpt}/hf"],
         "opdlm-convert-megatron-to-hf", "lies inside --megatron-dir"),
        (convert_megatron_to_hf.main, ["--megatron-dir", ckpt, "--out", tmp_path, "--overwrite"],
         "opdlm-convert-megatron-to-hf", "contains --megatron-dir"),
        (convert_hf_to_megatron.main, ["--hf-dir", hf, "--out", hf, "--overwrite"],
         "opdlm-convert-hf-to-megatron", f"--out {hf} is --hf-dir {hf}"),
        (convert_layout.main, ["--src", ckpt, "--dst", ckpt, "--to", "megatron-lm", "--overwrite"],
         "opdlm-convert-layout", f"--dst {ckpt} is --src {ckpt}"),
    ]
    for main, args, program, message in cases:
        _refused(main, args, program, message, capsys)
    assert {p: _snapshot(p) for p in (ckpt, hf)} == before
    assert sorted(os.listdir(tmp_path)) == ["h", "link", "x"]


def test_generate_refuses_an_output_that_is_its_prompts_file(assets, tmp_path, capsys):
    from opdlm_megatron.commands import generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    before = prompts.read_text()
    _refused(generate.main, ["--checkpoint", assets["ckpt"], "--prompts", prompts, "--out", prompts,
                             "--tokenizer", tmp_path], "opdlm-generate", "is --prompts", capsys)
    assert prompts.read_text() == before


def test_train_refuses_a_save_directory_holding_its_student(assets, tmp_path, capsys):
    """keep_last would delete a student checkpoint inside the run's checkpoint directory."""
    from opdlm_megatron.commands import train

    run = tmp_path / "run"
    student = _copy(assets["ckpt"], run / "checkpoints" / "init")
    before = _snapshot(run)
    _refused(train.main, ["--config", REPO_ROOT / "configs" / "tiny_cpu.yaml", f"model.student_checkpoint={student}",
                          f"data.path={assets['prompts']}", f"run_dir={run}"],
             "opdlm-train", "contains model.student_checkpoint", capsys)
    assert _snapshot(run) == before


# ------------------------------------------------------------- 2. two writers on one directory
def test_a_second_run_on_the_same_run_directory_is_refused(assets, tmp_path, capsys):
    from opdlm_megatron.commands import train

    run = tmp_path / "run"
    args = ["--config", REPO_ROOT / "configs" / "tiny_cpu.yaml", f"model.student_checkpoint={assets['ckpt']}",
            f"data.path={assets['prompts']}", f"run_dir={run}", "train.steps=12", "checkpoint.save_every=1",
            "logging.progress_bar=false"]
    first = subprocess.Popen([sys.executable, "-m", "opdlm_megatron.train", *map(str, args)], env=_env(),
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run / ".opdlm.lock"
    deadline = time.time() + 240
    while time.time() < deadline and not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        time.sleep(0.2)
    assert f"pid {first.pid}" in lock.read_text()
    # the second run in this process (its imports are done: it reaches the lock while the first trains)
    error = _refused(train.main, args, "opdlm-train", f"run_dir {os.path.realpath(run)} is in use by pid {first.pid} "
                     "on host", capsys)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert "Traceback" not in error
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(12))  # one writer: every step once


def test_the_lock_is_freed_when_its_process_dies(tmp_path):
    """flock: a run killed with SIGKILL leaves the file, not the lock (the kill -9 drill relies on it)."""
    from opdlm_megatron.runtime.run_lock import RunDirectoryLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from opdlm_megatron.runtime.run_lock import RunDirectoryLock;"
                               "RunDirectoryLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(REPO_ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"is in use by pid {holder.pid} on host"):
        RunDirectoryLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    lock = RunDirectoryLock(str(tmp_path)).acquire()
    assert f"pid {os.getpid()}" in (tmp_path / ".opdlm.lock").read_text()
    lock.release()


def test_megatron_lm_save_directory_is_locked(assets, tmp_path):
    from opdlm_megatron.integrations.megatron_lm import claim_save_directory
    from opdlm_megatron.runtime.run_lock import RunDirectoryLock

    save = tmp_path / "save"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from opdlm_megatron.runtime.run_lock import RunDirectoryLock;"
                               "RunDirectoryLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(REPO_ROOT), str(save)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"--save directory .* is in use by pid {holder.pid}"):
            claim_save_directory(["--opd-student", assets["ckpt"], "--save", str(save)])
        with pytest.raises(ValueError, match="--save .* contains --opd-student"):
            claim_save_directory(["--opd-student", f"{tmp_path}/s/ckpt", "--save", str(tmp_path / "s")])
    finally:
        holder.kill()
        holder.wait()
    RunDirectoryLock(str(save)).release()  # nothing held by this process: a no-op


# -------------------------------------------------------------- 3. outputs checked before work
def _read_only_dir():
    """A directory no process can create files in (sysfs), or None where this machine lets us."""
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys"
    os.close(fd)
    os.unlink(name)
    return None


def test_outputs_are_checked_before_any_work(assets, tmp_path, capsys):
    from opdlm_megatron.commands import evaluate, generate, prepare_smollm2, train

    plain = tmp_path / "plain_file"
    plain.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cases = [
        (evaluate.main, ["--student", assets["ckpt"], "--task", "chain_sum", "--out", plain, "--tokenizer", tmp_path],
         "opdlm-eval", f"--out {plain} exists and is not a directory"),
        (generate.main, ["--checkpoint", assets["ckpt"], "--prompts", prompts, "--out", folder, "--tokenizer",
                         tmp_path], "opdlm-generate", f"--out {folder} is a directory; give a file path"),
        (generate.main, ["--checkpoint", assets["ckpt"], "--prompts", prompts, "--out", plain / "out.jsonl",
                         "--tokenizer", tmp_path], "opdlm-generate", "is not a directory"),
    ]
    read_only = _read_only_dir()
    if read_only:
        cases += [
            (train.main, ["--config", REPO_ROOT / "configs" / "tiny_cpu.yaml", f"model.student_checkpoint={assets['ckpt']}",
                          f"data.path={assets['prompts']}", f"run_dir={read_only}/opdlm-run"],
             "opdlm-train", f"run_dir {read_only}/opdlm-run: cannot write in {read_only}"),
            (prepare_smollm2.main, ["--out", f"{read_only}/smollm2"], "opdlm-prepare-smollm2",
             f"--out {read_only}/smollm2: cannot write in {read_only}"),
        ]
    for main, args, program, message in cases:
        _refused(main, args, program, message, capsys)
    assert sorted(os.listdir(tmp_path)) == ["folder", "p.jsonl", "plain_file"]
    assert os.listdir(folder) == []


# --------------------------------------------------------------------- 4. tracebacks that remain
def test_malformed_configs_and_inputs_get_one_line(assets, tmp_path, capsys):
    from opdlm_megatron.commands import convert_hf_to_megatron, lm_eval, plan, train

    config = REPO_ROOT / "configs" / "tiny_cpu.yaml"
    listed = tmp_path / "listed.yaml"
    listed.write_text(config.read_text().replace("rollout:\n", "rollout: [1, 2]\nunused:\n", 1))
    hf_list = _copy(assets["hf"], tmp_path / "hf_list")
    with open(os.path.join(hf_list, "config.json"), "w") as f:
        json.dump([1, 2], f)
    base = [f"model.student_checkpoint={assets['ckpt']}", f"data.path={assets['prompts']}", f"run_dir={tmp_path}/r"]
    cases = [
        (train.main, ["--config", config, *base, "train=5"], "opdlm-train",
         "config section 'train' must be a mapping of keys, got int 5"),
        (train.main, ["--config", listed, *base], "opdlm-train", "config section 'rollout' must be a mapping"),
        (convert_hf_to_megatron.main, ["--hf-dir", hf_list, "--out", tmp_path / "out"], "opdlm-convert-hf-to-megatron",
         "config.json must hold a JSON object, got a list"),
        (plan.main, ["--config", REPO_ROOT / "configs" / "smollm2_opd.yaml", "--world-size", "1", "--model-config",
                     assets["ckpt"], "parallel.pipeline_model_parallel_size=0"], "opdlm-plan",
         "parallel.pipeline_model_parallel_size must be a positive integer, got 0"),
        (lm_eval.main, ["--checkpoint", assets["hf"], "--tasks", "gsm8k"], "opdlm-lm-eval",
         "is a HF model directory; convert it first"),
        (lm_eval.main, ["--checkpoint", assets["ckpt"], "--tasks", "no_such_task_xyz"], "opdlm-lm-eval",
         "unknown lm-eval task(s) ['no_such_task_xyz']"),
    ]
    for main, args, program, message in cases:
        _refused(main, args, program, message, capsys)
    assert sorted(os.listdir(tmp_path)) == ["hf_list", "listed.yaml"]


def _tiny_args(assets, run, *extra, steps=2):
    return ["--config", REPO_ROOT / "configs" / "tiny_cpu.yaml", f"model.student_checkpoint={assets['ckpt']}",
            f"data.path={assets['prompts']}", f"run_dir={run}", f"train.steps={steps}", "logging.progress_bar=false",
            *extra]


def _tiny_run(assets, run, *extra, steps=2):
    return _run("opdlm_megatron.train", *_tiny_args(assets, run, *extra, steps=steps))


def test_resume_names_what_changed(assets, tmp_path, capsys):
    """The first run is a process; the resumes run in this process (their imports are done)."""
    from opdlm_megatron.commands import train

    run = tmp_path / "run"
    first = _tiny_run(assets, run)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = _snapshot(run / "checkpoints")

    def resume(*extra, steps):
        capsys.readouterr()
        code = train.main([str(a) for a in _tiny_args(assets, run, *extra, steps=steps)])
        return code, capsys.readouterr().err

    # the optimizer state is keyed by the learning rates: refused, with what to do
    error = _refused(train.main, _tiny_args(assets, run, "optim.lr=5e-4", steps=3), "opdlm-train",
                     "was saved with optim.lr=0.0001; this run has optim.lr=0.0005", capsys)
    assert "resume with the saved values, or start a new run" in error
    assert _snapshot(run / "checkpoints") == saved
    # another divergence resumes, and says so once; asking for fewer steps than done says so too
    code, err = resume("loss.divergence=jsd", steps=3)
    assert code == 0, err[-2000:]
    said = [line for line in err.splitlines() if "changed settings" in line]
    assert len(said) == 1 and "loss.divergence 'forward_kl' -> 'jsd'" in said[0], err
    code, err = resume("loss.divergence=jsd", steps=1)
    assert code == 0
    said = [line for line in err.splitlines() if "nothing to train" in line]
    assert len(said) == 1 and "has done 3 steps and this config asks for 1" in said[0], err


# ------------------------------------------------------------------------- 5. silent changes
def test_skipped_and_out_of_vocabulary_prompts_are_said(assets, tmp_path):
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt_ids": [5, 6, 7]}, {"prompt_ids": list(range(3, 60))}, {"prompt_ids": [8, 9]},
             {"prompt_ids": [10, 11]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = _run("opdlm_megatron.train", "--config", REPO_ROOT / "configs" / "tiny_cpu.yaml",
               f"model.student_checkpoint={assets['ckpt']}", f"data.path={data}", f"run_dir={tmp_path}/run",
               "train.steps=1", "logging.progress_bar=false")
    assert run.returncode == 0, run.stderr[-2000:]
    said = [line for line in run.stderr.splitlines() if "skipped" in line]
    assert len(said) == 1 and "1 of 4 prompts are longer than data.max_prompt_tokens=32" in said[0], run.stderr
    # a token id outside the vocabulary, named by its file line (not by its place in a shuffled rollout)
    lines[3] = {"prompt_ids": [10, 999]}
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    bad = _run("opdlm_megatron.train", "--config", REPO_ROOT / "configs" / "tiny_cpu.yaml",
               f"model.student_checkpoint={assets['ckpt']}", f"data.path={data}", f"run_dir={tmp_path}/bad",
               "train.steps=1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        f"opdlm-train: error: {data}:4: prompt token ids outside the vocabulary [0, 250): [999]")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ 6. the screen and start-up
def _console_scripts():
    text = (REPO_ROOT / "setup.py").read_text()
    return re.findall(r'"(opdlm-[a-z0-9-]+)=([\w.]+):(\w+)"', text)


def test_help_of_every_console_script_imports_no_torch_and_warns_nothing():
    """``--help`` answers without importing torch or megatron (what made it take 5-7 s with 11 warning
    lines), under the console script's own name. (Wall times: benchmarks/cli_startup.py.)"""
    scripts = _console_scripts()
    assert len(scripts) == 11
    for name, module, function in scripts:
        code = (f"import sys; sys.argv = [{name!r}, '--help']\n"
                f"from {module} import {function}\n"
                f"try:\n    {function}()\nexcept SystemExit:\n    pass\n"
                f"print('HEAVY', sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
        proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                              env=_env(), cwd=REPO_ROOT, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr[-1500:])
        assert proc.stdout.startswith(f"usage: {name}"), (name, proc.stdout[:200])
        assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", (name, proc.stdout[-300:])
        assert proc.stderr == "", (name, proc.stderr[-1500:])


def test_training_screen_shows_only_the_projects_lines(assets, tmp_path):
    proc = _tiny_run(assets, tmp_path / "run", "logging.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines and all(line.startswith("opdlm-train: ") for line in lines), lines
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "UserWarning" in log and "megatron.core" in log  # the third-party lines went to the run's log


def test_converter_errors_are_one_line_under_the_scripts_name(assets, tmp_path):
    proc = _run("opdlm_megatron.commands.convert_hf_to_megatron", "--hf-dir", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"opdlm-convert-hf-to-megatron: error: HF model directory not found: {tmp_path / 'nope'}"]


# ------------------------------------------------------------- 7. the planner before a conversion
QWEN3_8B_HF = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_plan_from_a_hf_config_alone(tmp_path, capsys):
    from opdlm_megatron.commands import plan

    hf = tmp_path / "Qwen3-8B"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(QWEN3_8B_HF))
    config = REPO_ROOT / "configs" / "qwen3_8b_opd_fp8.yaml"
    for source in (hf / "config.json", hf):
        assert plan.main(["--config", str(config), "--world-size", "16", "--model-config", str(source)]) == 0
        out = capsys.readouterr().out
        assert out.strip().splitlines()[-1] == "fits", out
        assert "architecture from the HF config" in out and "transformer_engine (FP8 needs it)" in out
    for args, message in ((["--world-size", "0"], "--world-size must be a positive integer (the number of GPUs), got 0"),
                          (["--world-size", "16", "--gpu-memory-gb", "-10"], "--gpu-memory-gb must be positive, got -10")):
        _refused(plan.main, ["--config", config, "--model-config", hf, *args], "opdlm-plan", message, capsys)
