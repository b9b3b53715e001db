"""The common task interface (``Example``, ``Task``) and the registry of tasks by name."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One scored item: the text given to the model and the exact answer expected after it."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Returns ``text`` as a canonical number string ("+01,000.00" -> "1000", "-0" -> "0"), or ``text``
    stripped when it is not a number."""
    cleaned = text.strip().replace(",", "")
    if not re.fullmatch(r"[-+]?\d+(?:\.\d+)?", cleaned):
        return text.strip()
    sign = "-" if cleaned.startswith("-") else ""
    digits = cleaned.lstrip("+-")
    whole, _, fraction = digits.partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    canonical = f"{whole}.{fraction}" if fraction else whole
    return canonical if canonical == "0" else sign + canonical


def normalize_text(text: str) -> str:
    """Returns ``text`` lower-cased, stripped of surrounding whitespace, quotes and final punctuation."""
    return re.sub(r"^[\s\"'`]+|[\s\"'`.!?;:,]+$", "", text.lower())


def last_number(text: str) -> str | None:
    """Returns the last number written in ``text`` (commas allowed), or None."""
    found = _NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def first_number(text: str) -> str | None:
    """Returns the first number written in ``text`` (commas allowed), or None."""
    found = _NUMBER.search(text)
    return found.group(0).rstrip(",") if found else None


def first_line(text: str) -> str:
    """Returns ``text`` up to its first newline."""
    return text.split("\n", 1)[0]


class Task:
    """A generator of ``Example``s with exact answers, plus how to read and check a model's completion.

    Subclasses set ``name``, implement ``examples`` and, where answers are not plain numbers,
    override ``extract_answer`` / ``normalize``.

    How an answered example reads in the task's own text, which training targets copy exactly:
    ``answer_prefix`` comes between the prompt and the answer ("Answer: 5" has " ", MQAR's "tiger=42" has
    ""); ``answer_context`` is what follows the answer's ending newline in the task's text ("\nQuestion:"
    in few-shot prompts, whose blocks are joined by a blank line), so the ending tokenizes as in running
    text (Gemma's tokenizer has one token for "\n\n").
    """

    name: str = "task"
    max_new_tokens: int = 16
    stop_at_newline: bool = True
    answer_prefix: str = " "
    answer_context: str = ""
    breakdown_keys: tuple[str, ...] = ()

    def examples(self, n: int, seed: int) -> list[Example]:
        """Returns ``n`` examples, identical for the same ``seed``."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Returns the task's parameters, for reports."""
        return {}

    def extract_answer(self, completion: str) -> str:
        """Returns the answer read from a model's completion (default: the first number on its first line)."""
        line = first_line(completion)
        number = first_number(line)
        return number if number is not None else line.strip()

    def normalize(self, answer: str) -> str:
        """Returns ``answer`` in the canonical form used for exact match."""
        return normalize_number(answer)

    def is_correct(self, prediction: str, answer: str) -> bool:
        """Returns whether an extracted prediction matches the expected answer after normalisation."""
        return self.normalize(prediction) == self.normalize(answer)


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Returns a decorator that registers a task factory (a class or function) under ``name``."""

    def decorator(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"task {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtin_tasks() -> None:
    from graftlm.eval import mqar, needle, reasoning  # noqa: F401  (their imports register the tasks)


def available_tasks() -> list[str]:
    """Returns the names of all registered tasks, sorted."""
    _load_builtin_tasks()
    return sorted(_REGISTRY)


def task_accepts(name: str, parameter: str) -> bool:
    """Returns whether the factory registered as ``name`` takes a keyword ``parameter`` (False for unknown names)."""
    _load_builtin_tasks()
    return name in _REGISTRY and parameter in inspect.signature(_REGISTRY[name]).parameters


def get_task(name: str, **kwargs: Any) -> Task:
    """Returns the task registered as ``name`` built with ``kwargs``; unknown names or parameters raise
    ``ValueError`` naming what is accepted."""
    _load_builtin_tasks()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    accepted = inspect.signature(factory).parameters
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ValueError(f"task {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"it accepts: {', '.join(accepted)}")
    return factory(**kwargs)


def parse_task_value(text: str) -> Any:
    """Returns a command-line value as int, float, bool or None where it reads as one, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text
