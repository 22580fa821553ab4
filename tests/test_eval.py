"""opdlm-eval: scorers and answer extraction on fixed cases, metrics on hand-made cases, the CLI end
to end on a tiny model (accuracy recomputed from its samples; TP=2 == TP=1) and its bad inputs."""

import json
import math
import os

import pytest

from opdlm_megatron.eval import scoring
from opdlm_megatron.eval.metrics import (accuracy, accuracy_under_parallelism, edit_distance, edit_similarity,
                                         teacher_agreement)
from tests.conftest import run_torchrun
from tests.helpers import save_tiny_student


@pytest.mark.parametrize("text,how,expected", [
    ("so the total is 1,234 apples.", "last_number", "1234"),
    ("-3 then 4.5", "last_number", "4.5"),
    ("no digits here", "last_number", ""),
    ("thus \\boxed{\\frac{1}{2}} done", "boxed", "\\frac{1}{2}"),
    ("\\boxed{3} and later \\boxed{7}", "boxed", "7"),
    ("\\boxed{unbalanced", "boxed", ""),
    ("<answer> 42 </answer>", "answer_tag", "42"),
    ("<answer>x</answer> but \\boxed{9}", "auto", "x"),
    ("\\boxed{9} is 10", "auto", "9"),
    ("it is 10", "auto", "10"),
    ("Paris", "auto", "Paris"),
])
def test_extraction(text, how, expected):
    assert scoring.extract(text, how) == expected


@pytest.mark.parametrize("pred,ref,how,expected", [
    ("72", "72.0", "normalized", True), ("1,000", "1000", "normalized", True), ("$5$", "5", "normalized", True),
    ("Paris.", "paris", "normalized", True), ("Paris.", "paris", "exact", False), ("7", "8", "numeric", False),
    ("\\text{yes}", "Yes", "normalized", True), ("abc", "abc", "numeric", False),
])
def test_match(pred, ref, how, expected):
    assert scoring.match(pred, ref, how) is expected


def test_reasoning_gym_scorer_on_its_own_answers():
    import reasoning_gym

    from opdlm_megatron.eval.tasks import TaskSpec, load_task

    items = load_task(TaskSpec("basic_arithmetic", num_samples=5, options={"min_terms": 2, "max_terms": 2,
                                                                            "min_digits": 1, "max_digits": 1}))
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=0, min_terms=2, max_terms=2,
                                           min_digits=1, max_digits=1)
    assert [i.question for i in items] == [dataset[k]["question"] for k in range(5)]
    for item in items:
        assert item.score(f"The answer is {item.reference}") == 1.0
        assert item.score("The answer is 123456") < 1.0  # (reasoning-gym gives partial credit to some wrong answers)


def test_metrics_on_hand_made_cases():
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    assert edit_similarity([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75 and edit_similarity([], []) == 1.0
    agreement = teacher_agreement([[1, 2], [3], [5, 6, 7]], [[1, 2], [4], [5, 6]])
    assert agreement["exact"] == pytest.approx(1 / 3)
    assert agreement["edit_similarity"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    mean, se = accuracy([[1.0], [0.0], [1.0], [1.0]])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert accuracy([[1.0, 0.0], [1.0, 1.0]])[0] == 0.75  # mean over seeds, then items
    # AUP: frontier best(x) = 0.8 on [0, 1], 0.7 on (1, 2], 0.5 on (2, 3]
    assert accuracy_under_parallelism([(1.0, 0.8), (2.0, 0.7), (3.0, 0.5), (1.5, 0.6)]) == pytest.approx(2.0)
    assert accuracy_under_parallelism([(1.0, 0.4)]) == pytest.approx(0.4)  # AR: its accuracy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random student with a word-level chat tokenizer, and a JSONL task whose references are
    the teacher's own greedy answers for half the items (so the teacher scores exactly 0.5)."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = root / "ckpt"
    save_tiny_student(ckpt, seed=11, max_sequence_length=128)
    questions = [f"what is {a} + {b} ?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]]
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "reference": "placeholder"}) + "\n" for q in questions))
    return dict(root=root, ckpt=str(ckpt), data=str(data), questions=questions)


def test_eval_end_to_end_and_tp2(tiny, tmp_path):
    from opdlm_megatron.evaluate import main

    common = ["--student", tiny["ckpt"], "--task", "jsonl", "--data", tiny["data"], "--max-new-tokens", "8",
              "--batch-size", "4", "--match", "exact", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "probe")]) == 0
    teacher = [r for r in map(json.loads, open(tmp_path / "probe" / "samples.jsonl")) if r["model"] == "teacher"]
    # references: the teacher's own answers for even items, something else for odd ones
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "reference": teacher[i]["completion"] if i % 2 == 0 else "w9 w9"})
                            + "\n" for i, q in enumerate(tiny["questions"])))
    common[common.index(tiny["data"])] = str(data)
    assert main([*common, "--sweep", "--out", str(tmp_path / "tp1")]) == 0
    summary = json.load(open(tmp_path / "tp1" / "summary.json"))
    samples = [json.loads(line) for line in open(tmp_path / "tp1" / "samples.jsonl")]
    assert summary["results"]["teacher"]["accuracy"] == 0.5
    assert set(summary["results"]) == {"teacher", "student tau=0.9", "student tau=0.5", "student tau=0.7",
                                      "student tau=0.95", "student k=1", "student k=2", "student factor=1",
                                      "student eb=0.5", "student hier=0.4"}
    for name, result in summary["results"].items():
        rows = [r for r in samples if f"{r['model']} {r['setting']}".replace("teacher ar", "teacher") == name]
        assert len(rows) == 6
        assert result["accuracy"] == pytest.approx(sum(r["score"] for r in rows) / 6)
        assert result["tokens_per_forward"] == pytest.approx(sum(r["answer_tokens"] for r in rows)
                                                              / sum(r["forwards"] for r in rows))
        assert result["hit_length_limit"] == pytest.approx(sum(not r["finished"] for r in rows) / 6)
    k1 = summary["results"]["student k=1"]
    assert k1["tokens_per_forward"] == pytest.approx(1.0)  # static one token per step
    assert summary["results"]["student k=2"]["tokens_per_forward"] > 1.0
    assert 0.0 <= summary["teacher_agreement"]["exact"] <= 1.0 and "aup" in summary
    assert os.path.getsize(tmp_path / "tp1" / "accuracy_tpf.png") > 1000

    out = tmp_path / "tp2"
    run_torchrun("eval_cli.py", *common, "--tp", "2", "--out", str(out))
    got = [json.loads(line) for line in open(out / "samples.jsonl")]
    want = [r for r in samples if r["setting"] in ("ar", "tau=0.9")]
    assert [r["completion_ids"] for r in got] == [r["completion_ids"] for r in want]
    tp2 = json.load(open(out / "summary.json"))
    assert tp2["results"]["student tau=0.9"]["accuracy"] == summary["results"]["student tau=0.9"]["accuracy"]


@pytest.mark.parametrize("args,needle", [
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["--task", "jsonl", "--data", "EMPTY"], "is empty"),
    (["--task", "math_jsonl", "--data", "NOANSWER"], "missing field 'answer'"),
    (["--task", "jsonl", "--data", "MISSING"], "--data file not found"),
    (["--task", "basic_arithmetic", "--threshold", "1.5"], "--threshold must lie in (0, 1], got 1.5"),
    (["--task", "basic_arithmetic", "--task-options", "{bad"], "--task-options is not JSON"),
    (["--task", "basic_arithmetic", "--seeds", "3"], "--seeds > 1 needs --temperature > 0"),
])
def test_bad_inputs_give_one_line_and_exit_2(tiny, tmp_path, capsys, args, needle):
    from opdlm_megatron.evaluate import main

    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "NOANSWER").write_text(json.dumps({"question": "q"}) + "\n")
    args = [a if a not in ("EMPTY", "NOANSWER", "MISSING") else str(tmp_path / a) for a in args]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["--student", tiny["ckpt"], "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_not_a_checkpoint(tmp_path, capsys):
    from opdlm_megatron.evaluate import main

    (tmp_path / "hf").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["--student", str(tmp_path / "hf"), "--task", "basic_arithmetic", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "is not an opdlm-megatron checkpoint" in capsys.readouterr().err


def test_sampling_seeds_average_per_item(tiny, tmp_path):
    from opdlm_megatron.evaluate import main

    out = tmp_path / "seeds"
    assert main(["--student", tiny["ckpt"], "--task", "jsonl", "--data", tiny["data"], "--max-new-tokens", "8",
                 "--temperature", "1.0", "--seeds", "2", "--no-teacher", "--no-progress", "--out", str(out),
                 "--system-prompt", "Answer briefly.", "--data-seed", "3"]) == 0
    recorded = json.load(open(out / "summary.json"))  # what decides the prompts, to reproduce the numbers
    assert (recorded["system_prompt"], recorded["data_seed"], recorded["data"]) == ("Answer briefly.", 3, tiny["data"])
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == 2 * len(tiny["questions"])
    assert any(a["completion_ids"] != b["completion_ids"] for a, b in zip(rows[:6], rows[6:]))  # seeds differ
    summary = json.load(open(out / "summary.json"))["results"]["student tau=0.9"]
    assert summary["samples"] == 12 and summary["accuracy"] == pytest.approx(sum(r["score"] for r in rows) / 12)
