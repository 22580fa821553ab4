"""The project's prompt families (``families.py``): reproducible items, exact scorers that accept the
reference (and its harmless rewrites) and refuse anything else, and one lookup with reasoning-gym's
datasets for training and evaluation."""

import pytest

from opdlm_megatron.data.families import FAMILIES, PREFIX, FamilyDataset, create_dataset, family_names, number_words


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_scores_its_reference_and_nothing_else(name):
    data = FamilyDataset(PREFIX + name, size=30, seed=3)
    again = FamilyDataset(PREFIX + name, size=50, seed=3)
    questions = set()
    for i in range(len(data)):
        entry = data[i]
        assert entry == again[i]  # item i depends on (seed, i) only
        questions.add(entry["question"])
        assert data.score_answer(entry["answer"], entry) == 1.0
        assert data.score_answer("  " + entry["answer"] + "  \n", entry) == 1.0
        assert data.score_answer(entry["answer"] + " extra", entry) == 0.0
        assert data.score_answer("", entry) == 0.0
    assert len(questions) > 10
    assert FamilyDataset(PREFIX + name, size=5, seed=4)[0] != data[0] or name == "alphabet_next"


def test_shots_prefix_solved_examples_and_keep_the_item():
    plain = FamilyDataset("opdlm/date_format", 20, 7)
    shot = create_dataset("opdlm/date_format", 20, 7, shots=2)
    for i in range(len(plain)):
        a, b = plain[i], shot[i]
        assert b["answer"] == a["answer"] and b["question"].endswith(a["question"])
        examples = b["question"][: -len(a["question"])].split("Example:\n")[1:]
        assert len(examples) == 2
        for example in examples:  # each example is a solved item of the family: its answer scores 1
            question, answer = example.strip().split("\nAnswer: ")
            y, m, d = question.split("date ")[1][:10].split("-")
            assert answer == f"{d}/{m}/{y}"
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(ValueError, match="shots"):
            create_dataset("opdlm/date_format", 5, 0, shots=bad)
    with pytest.raises(ValueError, match="only the option 'shots'"):
        create_dataset("opdlm/date_format", 5, 0, min_terms=2)


def test_number_words_and_references_by_hand():
    assert [number_words(n) for n in (0, 13, 20, 47, 99)] == ["zero", "thirteen", "twenty", "forty-seven", "ninety-nine"]
    date = FamilyDataset("opdlm/date_format", 1, 0)[0]
    y, m, d = date["question"].split("date ")[1][:10].split("-")
    assert date["answer"] == f"{d}/{m}/{y}"
    upper = FamilyDataset("opdlm/uppercase", 1, 0)
    entry = upper[0]
    assert upper.score_answer(entry["answer"].lower(), entry) == 0.0  # case matters where it is the task


def test_one_lookup_for_families_and_reasoning_gym():
    assert create_dataset("opdlm/count_up", 3, 0)[0]["answer"].count(",") >= 4
    assert len(create_dataset("chain_sum", 3, 0)) == 3
    with pytest.raises(ValueError, match="unknown family 'opdlm/nope'"):
        create_dataset("opdlm/nope", 3, 0)
    assert len(family_names()) == len(FAMILIES) >= 10


def test_evaluation_takes_a_family_by_name_and_scores_the_whole_completion():
    from opdlm_megatron.eval.tasks import TaskSpec, load_task

    items = load_task(TaskSpec(task="opdlm/date_format", num_samples=4))
    assert len(items) == 4
    assert items[0].score(items[0].reference) == 1.0  # "15/03/2024": not just its last number
    assert items[0].score(items[0].reference.split("/")[-1]) == 0.0


def test_teacher_confidence_quick_measures_accuracy_and_confidence(tmp_path):
    """benchmarks/teacher_confidence.py --quick: a tiny random teacher on one reasoning-gym dataset and one
    family; every row carries accuracy, answer length and the confidence shares, which are shares."""
    import json
    import re

    from tests.conftest import REPO_ROOT
    from tests.test_main_job import _python

    stdout = _python(str(REPO_ROOT / "benchmarks" / "teacher_confidence.py"), "--quick")
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"families=2 accurate_and_confident=\S+", last), last
    rows = json.load(open(re.search(r"^table: (\S+)$", stdout, re.M).group(1)))["rows"]
    assert [r["family"] for r in rows] == ["chain_sum", "opdlm/copy_sentence"]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("accuracy", "p_ge_0.9", "p_ge_0.7", "pairs_ge_0.9", "mean_p"))
    assert all(r["p_ge_0.9"] <= r["p_ge_0.7"] for r in rows) and all(r["answer_tokens"] > 0 for r in rows)
    for r in rows:  # --quick measures the tiny model as a student on its own answers
        got = r["students"]["tiny"]
        assert len(got["per_slot_p_ge_0.9"]) == len(r["teacher_per_slot_p_ge_0.9"]) == 4
        assert all(0 <= x <= 1 for x in [got["p_ge_0.9"], *got["per_slot_p_ge_0.9"]])
        assert (got["sure_and_right"] is None) == (got["p_ge_0.9"] == 0)  # undefined where nothing is sure
        assert 1 <= got["commits_per_round"] <= 4


def test_teacher_confidence_refuses_a_student_that_is_not_a_checkpoint(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "teacher_confidence.py"), "--quick",
                           "--student", f"late={tmp_path / 'missing'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "teacher_confidence: error: --student wants LABEL=CKPT with an existing checkpoint directory, "
        f"got 'late={tmp_path / 'missing'}'")
    assert "Traceback" not in proc.stderr


def _teacher_confidence_module():
    from tests.conftest import REPO_ROOT
    from tests.helpers import load_script

    return load_script(REPO_ROOT / "benchmarks" / "teacher_confidence.py", "teacher_confidence")


@pytest.mark.parametrize("logit_shift", [False, True])
def test_first_round_confidence_matches_each_decoding_state(runtime, logit_shift):
    """teacher_confidence.first_round (every block's first round from one forward of the training layout)
    against the plain-torch reference forward of each block's decoding state on a row of its own: the
    prompt, the answer's earlier blocks, the block's slots all [MASK] (block-causal by a brute-force rule:
    the prompt tiled from its start, the answer starting a fresh block)."""
    import torch

    from opdlm_megatron.distill.answers import results_from_answers
    from opdlm_megatron.model.build import build_model
    from tests.helpers import reference_forward, tiny_config

    bench = _teacher_confidence_module()
    config = tiny_config(logit_shift=logit_shift)
    model = build_model(config, "student").eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    answer_ids = [[20, 21, 22, 23, 24, 25], [30, 31, 32]]  # a partial last block in both
    answers = results_from_answers(prompts, answer_ids, [True, True], config.pad_token_id or 0)
    top, right = bench.first_round(model, config, answers, 2)
    b, unused = config.block_size, config.unused_token_mask(0, config.padded_vocab_size(1))
    for i, (prompt, answer) in enumerate(zip(prompts, answer_ids)):
        for start in range(0, len(answer), b):
            n = min(b, len(answer) - start)
            ids = prompt + answer[:start] + [config.mask_token_id] * n
            P = len(prompt)
            block = [k // b if k < P else -(-P // b) + (k - P) // b for k in range(len(ids))]
            allowed = torch.tensor([[block[k] <= block[q] for k in range(len(ids))] for q in range(len(ids))])
            with torch.no_grad():
                logits = reference_forward(state, config, torch.tensor([ids]), allowed[None],
                                           torch.arange(len(ids))[None])[0].double()
            for s in range(n):
                column = P + start + s - (1 if logit_shift else 0)
                probs = logits[column].masked_fill(unused, float("-inf")).softmax(-1)
                assert float(top[i, start + s]) == pytest.approx(float(probs.max()), rel=1e-4)
                assert bool(right[i, start + s]) == (int(probs.argmax()) == answer[start + s])
    assert bool((top[answers.answer_valid] > 0).all()) and bool((top[~answers.answer_valid] == 0).all())


def test_first_round_summary_counts_commits_per_block():
    """commits per round: the sure slots of each block's first round, at least one, at most the block's tokens."""
    import torch

    bench = _teacher_confidence_module()
    top = torch.tensor([[0.95, 0.2, 0.91, 0.99, 0.1, 0.0], [0.3, 0.2, 0.1, 0.2, 0.97, 0.0]])
    right = torch.tensor([[True, False, False, True, False, False], [False] * 4 + [True, False]])
    valid = torch.tensor([[True] * 5 + [False], [True] * 5 + [False]])
    got = bench.first_round_summary(top, right, valid, 4)
    # blocks: [0.95 .2 .91 .99] -> 3, [.1] -> 1, [.3 .2 .1 .2] -> 1, [.97] -> 1
    assert got["commits_per_round"] == pytest.approx(6 / 4)
    assert got["p_ge_0.9"] == pytest.approx(4 / 10) and got["sure_and_right"] == pytest.approx(3 / 4)
    assert got["per_slot_p_ge_0.9"] == pytest.approx([2 / 4, 0, 1 / 2, 1 / 2])
