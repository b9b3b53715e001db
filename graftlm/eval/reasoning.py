"""Arithmetic and small reasoning tasks from ``reasoning-gym``, with one ``difficulty`` integer (1 = easiest).

Each dataset's config is derived from ``difficulty`` by a function below. Prompts are few-shot::

    Question: State the final answer to the following arithmetic problem: 4 + 1 =
    Answer: 5

    Question: ...
    Answer:

The shots come from the same dataset and difficulty under a different seed; the model's completion is
read up to its first newline.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from graftlm.eval.tasks import Example, Task, first_line, first_number, normalize_text, register_task

_SHOT_SEED_OFFSET = 1_000_003


def _terms_and_digits(difficulty: int) -> tuple[int, int]:
    """Returns (number of terms, digits per term): 1 -> (2, 1), 2 -> (3, 1), 3 -> (3, 2), 4 -> (4, 2), ..."""
    return 2 + difficulty // 2, 1 + (difficulty - 1) // 2


def chain_sum_config(difficulty: int) -> dict[str, Any]:
    """Returns chain_sum's config: more terms and digits with difficulty; negation from 5."""
    terms, digits = _terms_and_digits(difficulty)
    return {"min_terms": terms, "max_terms": terms, "min_digits": digits, "max_digits": digits,
            "allow_negation": difficulty >= 5}


def basic_arithmetic_config(difficulty: int) -> dict[str, Any]:
    """Returns basic_arithmetic's config: + and - at 1, then *, then / and negative numbers from 4."""
    terms, digits = _terms_and_digits(difficulty)
    operators = ("+", "-") if difficulty == 1 else ("+", "-", "*") if difficulty <= 3 else ("+", "-", "*", "/")
    # reasoning-gym 0.1.25 mislabels * and / answers when parentheses are off, so they stay on.
    return {"min_terms": terms, "max_terms": terms, "min_digits": digits, "max_digits": digits,
            "operators": operators, "allow_parentheses": difficulty >= 2, "allow_negation": difficulty >= 4,
            "format_style": "simple", "whitespace": "single"}


def products_config(difficulty: int) -> dict[str, Any]:
    """Returns products' config: 1x1 digits at 1, 1-2 digits at 2, 2x2 at 3, ...; three factors from 7."""
    return {"min_terms": 2 if difficulty < 7 else 3, "max_terms": 2 if difficulty < 7 else 3,
            "min_digits": (difficulty + 1) // 2, "max_digits": (difficulty + 2) // 2}


def gcd_config(difficulty: int) -> dict[str, Any]:
    """Returns gcd's config: values up to 20, 60, 200, 1000, 10**4, ...; three numbers from 5."""
    ceilings = (20, 60, 200, 1000)
    max_value = ceilings[difficulty - 1] if difficulty <= len(ceilings) else 10 ** (difficulty - 1)
    count = 2 if difficulty < 5 else 3
    return {"min_numbers": count, "max_numbers": count, "min_value": 1, "max_value": max_value}


def letter_counting_config(difficulty: int) -> dict[str, Any]:
    """Returns letter_counting's config: 1 word at 1, then 2*difficulty - 1 words."""
    words = 2 * difficulty - 1
    return {"min_words": words, "max_words": words}


def leg_counting_config(difficulty: int) -> dict[str, Any]:
    """Returns leg_counting's config: ``difficulty`` kinds of animal, 1 to 2*difficulty - 1 of each."""
    return {"min_animals": difficulty, "max_animals": difficulty, "min_instances": 1,
            "max_instances": 2 * difficulty - 1}


def spell_backward_config(difficulty: int) -> dict[str, Any]:
    """Returns spell_backward's config: words of difficulty + 2 letters."""
    return {"min_word_len": difficulty + 2, "max_word_len": difficulty + 2}


@dataclass(frozen=True)
class DatasetSpec:
    """How one reasoning-gym dataset becomes a task: its config per difficulty and its answer kind."""

    config: Callable[[int], dict[str, Any]]
    answer_kind: str  # "number" or "word"
    max_new_tokens: int


DATASETS: dict[str, DatasetSpec] = {
    "chain_sum": DatasetSpec(chain_sum_config, "number", 10),
    "basic_arithmetic": DatasetSpec(basic_arithmetic_config, "number", 10),
    "products": DatasetSpec(products_config, "number", 12),
    "gcd": DatasetSpec(gcd_config, "number", 8),
    "letter_counting": DatasetSpec(letter_counting_config, "number", 6),
    "leg_counting": DatasetSpec(leg_counting_config, "number", 8),
    "spell_backward": DatasetSpec(spell_backward_config, "word", 16),
}


def _expression_value(expression: str) -> Fraction | None:
    """Returns the exact value of an integer arithmetic expression (+ - * / and parentheses), or None."""
    if not re.fullmatch(r"[\d\s+\-*/()]+", expression):
        return None
    try:
        return eval(re.sub(r"(\d+)", r"Fraction(\1)", expression), {"__builtins__": {}, "Fraction": Fraction})
    except (ZeroDivisionError, SyntaxError):
        return None


def _answer_is_consistent(entry: dict) -> bool:
    """Returns False for arithmetic entries whose stated answer is not the value of their expression."""
    expression = entry["metadata"].get("expression")
    if entry["metadata"].get("source_dataset") not in ("chain_sum", "basic_arithmetic") or expression is None:
        return True
    value = _expression_value(expression)
    return value is not None and value == Fraction(entry["answer"])


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ReasoningGymTask(Task):
    """A reasoning-gym dataset at one difficulty, as few-shot prompts with exact answers."""

    answer_context = "\nQuestion:"  # an answered shot is followed by a blank line and the next question

    def __init__(self, dataset: str, difficulty: int = 1, shots: int = 3):
        if dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; supported: {', '.join(DATASETS)}")
        if difficulty < 1:
            raise ValueError(f"difficulty must be >= 1, got {difficulty}")
        if shots < 0:
            raise ValueError(f"shots must be >= 0, got {shots}")
        self.dataset, self.difficulty, self.shots = dataset, difficulty, shots
        self.name = dataset
        self.spec = DATASETS[dataset]
        self.max_new_tokens = self.spec.max_new_tokens

    def params(self) -> dict:
        """Returns the task's parameters, including the reasoning-gym config they map to."""
        return {"difficulty": self.difficulty, "shots": self.shots, "config": self.spec.config(self.difficulty)}

    def entries(self, n: int, seed: int) -> list[dict]:
        """Returns ``n`` raw reasoning-gym entries (question, answer, metadata) with consistent answers."""
        import reasoning_gym

        size = 2 * n + 8
        dataset = reasoning_gym.create_dataset(self.dataset, size=size, seed=seed,
                                               **self.spec.config(self.difficulty))
        kept = [entry for entry in dataset if _answer_is_consistent(entry)]
        if len(kept) < n:
            raise RuntimeError(f"{self.dataset}: only {len(kept)} of {size} generated entries were consistent")
        return kept[:n]

    def score_with_reasoning_gym(self, answer: str, entry: dict) -> float:
        """Returns reasoning-gym's own score of ``answer`` for ``entry`` (for cross-checking our normaliser)."""
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset, size=1, seed=0).score_answer(answer, entry)

    def format_prompt(self, question: str, shots: list[dict]) -> str:
        """Returns the few-shot prompt for ``question``, ending with "Answer:"."""
        blocks = [f"Question: {_one_line(s['question'])}\nAnswer: {s['answer']}" for s in shots]
        blocks.append(f"Question: {_one_line(question)}\nAnswer:")
        return "\n\n".join(blocks)

    def examples(self, n: int, seed: int) -> list[Example]:
        """Returns ``n`` few-shot examples, identical for the same ``seed``."""
        shots = self.entries(self.shots, seed + _SHOT_SEED_OFFSET) if self.shots else []
        out = []
        for index, entry in enumerate(self.entries(n, seed)):
            meta = {"dataset": self.dataset, "difficulty": self.difficulty, "index": index,
                    "question": entry["question"]}
            out.append(Example(self.format_prompt(entry["question"], shots), str(entry["answer"]), meta))
        return out

    def extract_answer(self, completion: str) -> str:
        """Returns the answer in the completion's first line: the whole line if it is the answer, else the
        number after its last "=", else its first number (or first word, for word answers)."""
        line = first_line(completion).strip()
        if self.spec.answer_kind == "word":
            words = line.split()
            return words[0] if words else ""
        bare = line.rstrip(".")
        if re.fullmatch(r"[-+]?\d[\d,]*(?:\.\d+)?", bare):
            return bare
        if "=" in line:
            after = first_number(line.rsplit("=", 1)[1])
            if after is not None:
                return after
        number = first_number(line)
        return number if number is not None else line

    def normalize(self, answer: str) -> str:
        """Returns the canonical form of ``answer``: a canonical number, or lower-cased text."""
        if self.spec.answer_kind == "word":
            return normalize_text(answer)
        return super().normalize(answer)


def _register(dataset: str) -> None:
    def factory(difficulty: int = 1, shots: int = 3) -> ReasoningGymTask:
        return ReasoningGymTask(dataset, difficulty=difficulty, shots=shots)

    factory.__doc__ = f"reasoning-gym {dataset} at a difficulty (1 = easiest) with few-shot prompts."
    register_task(dataset)(factory)


for _name in DATASETS:
    _register(_name)
