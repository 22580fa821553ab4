"""The proof issue's pieces: the data-efficiency study's --quick mode (every artefact produced), the
main job (examples/demo_smollm2.py) on a tiny model at TP=1 and TP=2, and the user's path
train -> generate -> export -> evaluate on its outputs without extra flags; a slow test runs the
real SmolLM2 main job."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_torchrun
from tests.helpers import save_tiny_student

DEMO = str(REPO_ROOT / "examples" / "demo_smollm2.py")


def _python(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_data_efficiency_quick_produces_every_artefact_and_resumes(tmp_path):
    out = tmp_path / "results"
    work = tmp_path / "work"
    script = str(REPO_ROOT / "benchmarks" / "data_efficiency.py")
    arms = "opd_all_rounds,mdlm,sft,opd_block@from=kd_off:1024"
    stdout = first = _python(script, "--quick", "--out", str(out), "--work", str(work), "--arms", arms)
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"teacher_acc=\S+ opd_acc=\S+ opd_tpf=\S+ opd_static_drop=\S+ sft_static_drop=\S+ "
                        r"mdlm_tokens_over_opd=\S+", last), last
    with open(out / "data_efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["arm"] for r in rows} == set(arms.split(","))
    assert {"paper_tokens", "supervised_tokens", "answer_tokens", "steps", "acc_tau09", "se_tau09", "tpf_tau09",
            "acc_static1", "acc_block1", "nll_ar_teacher_answers", "nll_block_teacher_answers"} <= set(rows[0])
    # the OPD arm has its extra budget; the warm start counts the source's tokens
    assert sorted(float(r["budget_tokens"]) for r in rows if r["arm"] == "opd_all_rounds") == [0, 1024, 2048]
    assert min(float(r["paper_tokens"]) for r in rows if r["arm"].startswith("opd_block@")) == 1024
    for name in ("data_efficiency_tokens.png", "data_efficiency_tpf.png", "data_efficiency_static.png",
                 "data_efficiency.json"):
        assert os.path.getsize(out / name) > 0, name
    # resumable: a rerun with one more arm trains only that arm and appends its rows
    stdout = _python(script, "--quick", "--out", str(out), "--work", str(work), "--arms", arms + ",kd_off")
    assert "opd_all_rounds: every budget is in" in stdout and "mdlm: every budget is in" in stdout
    with open(out / "data_efficiency.csv") as f:
        again = list(csv.DictReader(f))
    assert again[:len(rows)] == rows and {r["arm"] for r in again[len(rows):]} == {"kd_off"}
    # the summary alone, on a machine without the teacher (an empty --work): nothing is trained, and the
    # teacher's accuracy read off the untrained students' causal decoding is the one the teacher measured
    teacher_acc = re.search(r"held-out greedy accuracy (\S+)", first).group(1)
    summary = _python(script, "--quick", "--summary-only", "--out", str(out), "--work", str(tmp_path / "empty"),
                      "--arms", arms)
    assert "teacher step" not in summary and not os.listdir(tmp_path / "empty")
    assert summary.strip().splitlines()[-1] == stdout.strip().splitlines()[-1]
    assert summary.strip().splitlines()[-1].startswith(f"teacher_acc={teacher_acc} ")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("main_job") / "ckpt", seed=5, max_sequence_length=256)


TINY_JOB = ["--steps", "2", "--prompts-per-rollout", "4", "--batch", "4", "--micro-batch-size", "2",
            "--eval-prompts", "4", "--eval-tokens", "8", "--min-length", "4", "--max-length", "8"]


def test_main_job_pieces_and_the_users_path(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    stdout = _python(DEMO, "--checkpoint", tiny_ckpt, "--run-dir", str(run), *TINY_JOB)
    # the screen: our lines and the table, no third-party warnings
    assert "=== OPDLM main job" in stdout and "Warning" not in stdout and "DEPRECATED" not in stdout
    assert "is it as good?" in stdout and "is it faster?" in stdout
    summary = json.load(open(run / "summary.json"))
    assert set(summary["table"]) == {"teacher (AR)", "converted student tau=0.9", "converted student k=1",
                                     "trained student tau=0.9", "trained student k=1"}
    assert summary["table"]["trained student k=1"]["tokens_per_forward"] == pytest.approx(1.0)
    assert os.path.getsize(run / "accuracy_tpf.png") > 0 and os.path.getsize(run / "demo.log") > 0
    export = run / "hf_student"
    assert (export / "tokenizer.json").exists() and (export / "config.json").exists()

    # train -> generate -> evaluate on the training checkpoint, no --tokenizer
    latest = run / "checkpoints" / open(run / "checkpoints" / "latest").read().strip()
    assert (latest / "tokenizer" / "tokenizer.json").exists()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is 1 + 2 ?"}) + "\n")
    from opdlm_megatron.evaluate import main as evaluate
    from opdlm_megatron.generate import main as generate

    generate(["--checkpoint", str(latest), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
              "--max-new-tokens", "8", "--chat-template"])
    assert json.loads(open(tmp_path / "out.jsonl").readline())["completion_ids"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "what is 1 + 2 ?", "reference": "3"}) + "\n")
    assert evaluate(["--student", str(latest), "--task", "jsonl", "--data", str(qa), "--max-new-tokens", "8",
                     "--no-progress", "--out", str(tmp_path / "eval")]) == 0


@pytest.mark.distributed
def test_main_job_tp2(tiny_ckpt, tmp_path):
    run = tmp_path / "tp2"
    run_torchrun("../../examples/demo_smollm2.py", "--checkpoint", tiny_ckpt, "--run-dir", str(run), "--tp", "2",
                 *TINY_JOB)
    summary = json.load(open(run / "summary.json"))
    assert "trained student tau=0.9" in summary["table"] and len(summary["train"]) == 2


@pytest.mark.slow
def test_smollm2_main_job_reports_its_accuracy_table(tmp_path):
    run = tmp_path / "smol"
    stdout = _python(DEMO, "--run-dir", str(run), "--steps", "2", "--prompts-per-rollout", "8", "--batch", "4",
                     "--eval-prompts", "6", "--eval-tokens", "16", timeout=1500)
    summary = json.load(open(run / "summary.json"))
    assert "teacher (AR)" in summary["table"] and "trained student tau=0.9" in summary["table"]
    assert "=== OPDLM main job" in stdout and (run / "hf_student" / "tokenizer.json").exists()


def test_demo_reports_the_committed_full_run_per_family(tmp_path):
    """The main job's screen carries the longer run's committed per-family records (rollout_throughput
    --task --json-out): one line per family with its numbers, nothing when there are none."""
    from tests.helpers import load_script

    demo = load_script(DEMO, "demo_smollm2")
    path = tmp_path / "real_model.json"
    assert demo.full_run_lines(str(path)) == []
    path.write_text(json.dumps({
        "opdlm/count_up": {"teacher_acc": 0.1, "student_acc": 0.125, "student_tpf": 2.25, "speedup_vs_ar": 1.75,
                           "trained_checkpoint": "runs/x/checkpoints/step_00000240"},
        "chain_sum": {"teacher_acc": 0.4, "student_acc": 0.3, "student_tpf": 1.0, "speedup_vs_ar": 0.8}}))
    lines = demo.full_run_lines(str(path))
    assert len(lines) == 3 and "configs/smollm2_opd_families.yaml" in lines[0]
    assert lines[1] == ("  chain_sum: 0.300 vs the teacher's 0.400 at 1.00 tokens per forward, 0.80x HF generate's "
                        "answer tokens per second")
    assert lines[2].startswith("  opdlm/count_up: 0.125 vs the teacher's 0.100 at 2.25 tokens per forward, 1.75x")
    assert lines[2].endswith("(after 240 steps)")
    if os.path.exists(demo.FAMILIES_RESULTS):  # the committed records parse, one line each
        assert len(demo.full_run_lines()) == 1 + len(json.load(open(demo.FAMILIES_RESULTS)))
