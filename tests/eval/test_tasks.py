"""The task interface, the registry and the answer normalisers."""

import pytest

from graftlm.eval.tasks import (
    Example,
    available_tasks,
    first_number,
    get_task,
    last_number,
    normalize_number,
    normalize_text,
    parse_task_value,
)


def test_registry_lists_builtin_tasks_and_builds_them_with_parameters():
    names = available_tasks()
    for name in ("mqar", "needle", "chain_sum", "basic_arithmetic", "products", "gcd", "spell_backward"):
        assert name in names
    task = get_task("mqar", num_pairs=8, gap=64)
    assert (task.num_pairs, task.gap) == (8, 64)
    examples = task.examples(3, seed=0)
    assert len(examples) == 3 and all(isinstance(e, Example) for e in examples)


def test_registry_rejects_unknown_names_and_parameters_naming_them():
    with pytest.raises(ValueError, match="unknown task 'nope'.*mqar"):
        get_task("nope")
    with pytest.raises(ValueError, match="no parameter 'pairs'.*num_pairs"):
        get_task("mqar", pairs=3)


@pytest.mark.parametrize("text, expected", [
    ("42", "42"), ("+042", "42"), ("1,000", "1000"), ("-7.50", "-7.5"), ("3.0", "3"), ("-0", "0"),
    ("  12 ", "12"), ("abc", "abc"), ("-", "-"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_normalize_text_and_number_finders():
    assert normalize_text(' "Olleh". ') == "olleh"
    assert first_number("x = -12, then 7") == "-12"
    assert last_number("4 + 3 = 7.") == "7"
    assert first_number("no digits") is None


@pytest.mark.parametrize("text, value", [("8", 8), ("0.5", 0.5), ("true", True), ("None", None), ("abc", "abc")])
def test_parse_task_value_types_command_line_values(text, value):
    parsed = parse_task_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_eval_package_does_not_import_recipes_or_adapters():
    import pathlib

    import graftlm.eval

    for path in pathlib.Path(graftlm.eval.__file__).parent.glob("*.py"):
        source = path.read_text()
        for forbidden in ("graftlm.recipes", "graftlm.adapters", "from graftlm import"):
            assert forbidden not in source, (path.name, forbidden)
