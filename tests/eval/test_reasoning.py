"""reasoning-gym tasks: difficulty mapping, seeding, prompt format, and agreement with reasoning-gym's scorer."""

import re
from fractions import Fraction

import pytest

from graftlm.eval.reasoning import DATASETS, ReasoningGymTask
from graftlm.eval.tasks import get_task


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_seeded_and_different_across_seeds(dataset):
    task = get_task(dataset, difficulty=1)
    assert task.examples(6, seed=0) == task.examples(6, seed=0)
    assert [e.answer for e in task.examples(8, seed=0)] + [e.prompt for e in task.examples(8, seed=0)] != \
        [e.answer for e in task.examples(8, seed=1)] + [e.prompt for e in task.examples(8, seed=1)]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_reasoning_gym_scores_our_correct_answers_as_correct(dataset):
    task = ReasoningGymTask(dataset, difficulty=2)
    for entry in task.entries(15, seed=4):
        answer = str(entry["answer"])
        assert task.score_with_reasoning_gym(answer, entry) == 1.0
        completion = f" {answer}\nQuestion: next"
        assert task.is_correct(task.extract_answer(completion), answer)


@pytest.mark.parametrize("variant", ["{a}", " {a}.", "+{a}", "{a}.0", "0{a}"])
def test_numeric_normaliser_agrees_with_reasoning_gym_on_chain_sum_variants(variant):
    task = ReasoningGymTask("chain_sum", difficulty=3)
    for entry in task.entries(10, seed=5):
        answer = str(entry["answer"])
        if answer.startswith("-") and variant in ("+{a}", "0{a}"):
            continue
        text = variant.format(a=answer)
        ours = task.is_correct(task.extract_answer(text), answer)
        assert ours == (task.score_with_reasoning_gym(text, entry) == 1.0)


def test_wrong_answers_are_wrong_for_both_scorers():
    task = ReasoningGymTask("chain_sum", difficulty=2)
    for entry in task.entries(10, seed=6):
        wrong = str(int(entry["answer"]) + 1)
        assert not task.is_correct(task.extract_answer(wrong), entry["answer"])
        assert task.score_with_reasoning_gym(wrong, entry) < 1.0


def _operands(expression):
    return re.findall(r"\d+", expression)


@pytest.mark.parametrize("difficulty, terms, digits", [(1, 2, 1), (2, 3, 1), (3, 3, 2), (4, 4, 2)])
def test_difficulty_sets_terms_and_digits_of_chain_sum(difficulty, terms, digits):
    task = ReasoningGymTask("chain_sum", difficulty=difficulty)
    for entry in task.entries(10, seed=0):
        operands = _operands(entry["metadata"]["expression"])
        assert len(operands) == terms and all(len(o) == digits for o in operands)


def test_arithmetic_answers_equal_the_value_of_their_expression():
    for difficulty in (1, 2, 3, 4):
        task = ReasoningGymTask("basic_arithmetic", difficulty=difficulty)
        for entry in task.entries(20, seed=difficulty):
            expression = entry["metadata"]["expression"]
            value = eval(re.sub(r"(\d+)", r"Fraction(\1)", expression), {"Fraction": Fraction})
            assert value == Fraction(entry["answer"]), expression


def test_prompt_is_few_shot_and_ends_with_the_open_answer():
    task = ReasoningGymTask("basic_arithmetic", difficulty=1, shots=2)
    example = task.examples(1, seed=0)[0]
    blocks = example.prompt.split("\n\n")
    assert len(blocks) == 3 and example.prompt.endswith("\nAnswer:")
    assert all(re.search(r"\nAnswer: -?\d+$", block) for block in blocks[:2])
    assert example.meta["question"].replace("\n", " ").split()[-1] in blocks[2]


@pytest.mark.parametrize("completion, expected", [
    (" 12", "12"), (" 12.", "12"), (" 3 + 9 = 12", "12"), (" The answer is 12 apples", "12"), (" 1,200", "1,200"),
])
def test_numeric_extraction(completion, expected):
    assert ReasoningGymTask("chain_sum").extract_answer(completion) == expected


def test_word_answers_compare_case_insensitively_on_the_first_word():
    task = ReasoningGymTask("spell_backward")
    assert task.is_correct(task.extract_answer(" Olleh."), "olleh")
    assert not task.is_correct(task.extract_answer(" olle h"), "olleh")


def test_bad_difficulty_and_dataset_are_refused():
    with pytest.raises(ValueError, match="difficulty"):
        ReasoningGymTask("chain_sum", difficulty=0)
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        ReasoningGymTask("sudoku")
