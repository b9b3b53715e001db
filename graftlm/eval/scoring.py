"""Exact-match scoring of completions against a task's examples, with per-example records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from graftlm.eval.tasks import Example, Task


def score_completions(task: Task, examples: Sequence[Example], completions: Sequence[str]) -> list[dict[str, Any]]:
    """Returns one record per example: prompt, answer, completion, extracted prediction, correct, meta."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    records = []
    for example, completion in zip(examples, completions):
        prediction = task.extract_answer(completion)
        records.append({"prompt": example.prompt, "answer": example.answer, "completion": completion,
                        "prediction": prediction, "correct": task.is_correct(prediction, example.answer),
                        "meta": example.meta})
    return records


def accuracy(records: Sequence[dict[str, Any]]) -> float:
    """Returns the fraction of records marked correct (0.0 for no records)."""
    return sum(bool(r["correct"]) for r in records) / len(records) if records else 0.0


def accuracy_by(records: Sequence[dict[str, Any]], meta_key: str) -> dict[str, float]:
    """Returns accuracy per value of ``meta[meta_key]`` (values as strings, in sorted order of the values)."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if meta_key in record["meta"]:
            groups[record["meta"][meta_key]].append(record)
    return {str(value): accuracy(groups[value]) for value in sorted(groups)}
