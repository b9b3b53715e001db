"""Training data: (prompt, answer) examples -> tokenized `datasets.Dataset` with the loss on answer tokens only.

Examples come from a task of ``graftlm.eval`` (resolved by name at run time: recipes may import eval's
task generators, eval never imports recipes), from a JSON-lines file of ``{"prompt", "answer"}`` records,
or from any iterable of objects with ``prompt`` and ``answer`` attributes (`PromptAnswer`).

Tokenization matches greedy generation from the prompt: the prompt is tokenized alone (with the
tokenizer's special tokens, e.g. Gemma's ``<bos>``), the answer alone without special tokens, then
optionally EOS; labels are -100 on the prompt, so the loss counts only what the model must generate.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from graftlm.recipes.config import DataSection, RecipeError

IGNORE_INDEX = -100


@runtime_checkable
class PromptAnswer(Protocol):
    """What training needs of an example: the text shown and the exact text to produce."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def read_jsonl(path: str | Path) -> list[Example]:
    """``{"prompt": ..., "answer": ...}`` per line (blank lines skipped); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"data: dataset file {path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecipeError(f"data: {path}:{number} is not JSON ({err})") from None
        if not isinstance(record, dict) or not {"prompt", "answer"} <= set(record):
            raise RecipeError(f"data: {path}:{number} needs string fields 'prompt' and 'answer'")
        examples.append(Example(str(record["prompt"]), str(record["answer"])))
    return examples


def task_examples(name: str, kwargs: dict[str, Any], n: int, seed: int) -> list[PromptAnswer]:
    """``n`` seeded examples of the ``graftlm.eval`` task ``name`` (imported only when asked for)."""
    try:
        import graftlm.eval as evaluation
    except ImportError as err:
        raise RecipeError(f"data.task: cannot import graftlm.eval ({err}); use data.dataset instead") from err
    get_task = getattr(evaluation, "get_task", None)
    if get_task is None:
        try:
            from graftlm.eval.tasks import get_task
        except ImportError:
            get_task = None
    if get_task is None:
        raise RecipeError("data.task: graftlm.eval has no task registry (get_task) yet; use data.dataset instead")
    try:
        task = get_task(name, **kwargs)
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if err.args else err
        raise RecipeError(f"data.task: cannot make task {name!r} with {kwargs}: {message}") from None
    return list(task.examples(n, seed))


def load_examples(data: DataSection) -> tuple[list[PromptAnswer], list[PromptAnswer]]:
    """(train, held-out) examples for a recipe's data section.

    A task generates ``n_train + n_eval`` examples in one seeded call and the last ``n_eval`` are held
    out; a JSON-lines file without ``eval_dataset`` has ``n_eval`` records held out after a seeded shuffle.
    """
    if data.task is not None:
        examples = task_examples(data.task, data.task_kwargs, data.n_train + data.n_eval, data.seed)
        source = f"task {data.task!r}"
        split = len(examples) - min(data.n_eval, len(examples))
        return check_not_empty(examples[:split], source), examples[split:]
    examples = read_jsonl(data.dataset)
    source = f"dataset {data.dataset}"
    if data.eval_dataset is not None:
        return check_not_empty(examples, source), read_jsonl(data.eval_dataset)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(data.seed)).tolist()
    held_out = min(data.n_eval, len(examples) // 2)
    train = [examples[i] for i in order[held_out:]]
    return check_not_empty(train, source), [examples[i] for i in order[:held_out]]


def check_not_empty(examples: list, source: str) -> list:
    if not examples:
        raise RecipeError(f"data: the training set is empty ({source} gave no examples)")
    return examples


def tokenize_examples(
    examples: Iterable[PromptAnswer],
    tokenizer: Any,
    max_length: int,
    append_eos: bool = True,
    what: str = "training set",
):
    """A `datasets.Dataset` with ``input_ids`` and ``labels`` (-100 on the prompt); drops over-long examples.

    Raises `RecipeError` when nothing is left (no examples, or none fits ``max_length``).
    """
    from datasets import Dataset

    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    input_ids, labels = [], []
    total = 0
    for example in examples:
        total += 1
        prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + eos
        if not answer or len(prompt) + len(answer) > max_length:
            continue
        input_ids.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    if total and not input_ids:
        raise RecipeError(f"data: no example of the {what} fits max_length={max_length} tokens")
    if not input_ids:
        raise RecipeError(f"data: the {what} is empty")
    if len(input_ids) < total:
        warnings.warn(
            f"{total - len(input_ids)} of {total} examples of the {what} are longer than max_length={max_length} "
            f"tokens (or have an empty answer) and were dropped",
            stacklevel=2,
        )
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


class PaddingCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask``."""

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss averages over (labels shifted by one, -100 ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
