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
