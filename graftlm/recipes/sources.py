"""Where a recipe's training data comes from: a ``graftlm.eval`` task, a JSON-lines file, or a Hugging Face
``datasets`` source, as `TrainingText`s (train, held-out).

* **Task** (``data.task``): ``n_train + n_eval`` seeded examples in one call, the last ``n_eval`` held out;
  each target is ``prompt + task.answer_prefix + answer`` (exactly as the task writes answered examples)
  ended by ``answer_end`` (``auto``: a newline, tokenized with the task's ``answer_context``, for tasks
  scored up to the first newline).
* **Rows** (``data.dataset``): a ``.jsonl`` / ``.json`` file (errors name the line), a local dataset
  directory (``save_to_disk``), a builder with ``data_files`` (``json``, ``csv``, ``parquet``, ``text``) or a
  dataset name in the local Hugging Face cache. Each row becomes one example by its fields:
  ``text_field`` (plain language-model text, loss on every token, optionally packed), ``messages_field``
  (chat messages rendered with the tokenizer's chat template, loss on the last assistant message), else
  ``prompt_field`` + ``answer_field`` joined exactly as written (put the space where the text has it).
  Held out: ``eval_split``, or ``eval_dataset``, or ``n_eval`` rows after a seeded shuffle.

Nothing here needs the model; only chat rendering needs the tokenizer. Every error is a `RecipeError` that
names the field, split or line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from graftlm.recipes.config import DataSection, RecipeError, mixed_sections
from graftlm.recipes.data import Example, TrainingText, texts_from_examples

JSON_SUFFIXES = (".jsonl", ".json")


def load_training_data(data: DataSection, tokenizer: Any = None) -> tuple[list[TrainingText], list[TrainingText]]:
    """(train, held-out) `TrainingText`s of a recipe's data section, its ``mix`` sources' appended."""
    train, held_out = load_source_data(data, tokenizer)
    more_train, more_held_out = load_mixed_data(data, tokenizer)
    return train + more_train, held_out + more_held_out


def load_mixed_data(data: DataSection, tokenizer: Any = None) -> tuple[list[TrainingText], list[TrainingText]]:
    """(train, held-out) `TrainingText`s of the ``data.mix`` sources only."""
    train, held_out = [], []
    for section in mixed_sections(data):
        more_train, more_held_out = load_source_data(section, tokenizer)
        train, held_out = train + more_train, held_out + more_held_out
    return train, held_out


def load_source_data(data: DataSection, tokenizer: Any = None) -> tuple[list[TrainingText], list[TrainingText]]:
    """(train, held-out) `TrainingText`s of one source (the section's task or dataset, not its mix)."""
    if data.task is not None:
        return task_training_data(data, tokenizer)
    train_rows, eval_rows, source = load_rows(data)
    train = rows_to_texts(train_rows, data, tokenizer, source)
    return check_not_empty(train, source), rows_to_texts(eval_rows, data, tokenizer, f"{source} (held out)")


def check_not_empty(texts: list, source: str) -> list:
    if not texts:
        raise RecipeError(f"data: the training set is empty ({source} gave no examples)")
    return texts


# -- tasks ----------------------------------------------------------------------------------------
def make_task(name: str, kwargs: dict[str, Any], tokenizer: Any = None):
    """The ``graftlm.eval`` task ``name`` (given the tokenizer when it measures lengths in tokens)."""
    from graftlm.eval.runner import build_task

    try:
        return build_task(name, kwargs, tokenizer)
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if err.args else err
        raise RecipeError(f"data.task: cannot make task {name!r} with {kwargs}: {message}") from None


def task_answer_end(task: Any, answer_end: str) -> str:
    """``answer_end`` with ``auto`` resolved for ``task``: newline when it is scored up to a newline."""
    if answer_end != "auto":
        return answer_end
    return "newline" if getattr(task, "stop_at_newline", True) else "eos"


def task_texts(task: Any, examples: list, answer_end: str = "auto") -> list[TrainingText]:
    """The training texts of a task's examples: ``prompt + task.answer_prefix + answer`` + the ending."""
    return texts_from_examples(examples, getattr(task, "answer_prefix", " "), task_answer_end(task, answer_end),
                               getattr(task, "answer_context", ""))


def task_training_data(data: DataSection, tokenizer: Any = None) -> tuple[list[TrainingText], list[TrainingText]]:
    task = make_task(data.task, data.task_kwargs, tokenizer)
    examples = list(task.examples(data.n_train + data.n_eval, data.seed))
    split = len(examples) - min(data.n_eval, len(examples))
    texts = task_texts(task, examples, data.answer_end)
    return check_not_empty(texts[:split], f"task {data.task!r}"), texts[split:]


# -- rows of files and datasets -------------------------------------------------------------------
def read_jsonl(path: str | Path, option: str = "dataset") -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped); errors name the line (and ``data.<option>``)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"data.{option}: file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecipeError(f"data: {path}:{number} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise RecipeError(f"data: {path}:{number} is not a JSON object")
        rows.append({**record, "_where": f"{path}:{number}"})
    return rows


def _load_datasets_source(source: str, config: str | None, data_files: list[str] | None, option: str,
                          load_kwargs: dict[str, Any] | None = None):
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json",
                                                                      "state.json")):
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(source, config, data_files=data_files, **(load_kwargs or {}))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; the user needs the source named
        raise RecipeError(f"data.{option}: cannot load {source!r} with datasets ({type(err).__name__}: {err})") from None


def read_split(source: str, split: str, data: DataSection, what: str = "split", option: str = "dataset"
               ) -> list[dict[str, Any]]:
    """The rows of ``split`` of a JSON-lines file (its only split) or a datasets source (``data.<option>``)."""
    if source.endswith(JSON_SUFFIXES) and Path(source).is_file():
        if split != "train":
            raise RecipeError(f"data.{what}: {source} is a JSON-lines file, which has only the split 'train'")
        return read_jsonl(source, option)
    if source.endswith(JSON_SUFFIXES) and not Path(source).exists() and not data.data_files:
        raise RecipeError(f"data.{option}: file {source} does not exist")
    loaded = _load_datasets_source(source, data.dataset_config, data.data_files, option, data.load_kwargs)
    if hasattr(loaded, "keys"):
        if split not in loaded:
            raise RecipeError(f"data.{what}: {split!r} is not a split of {source}; its splits: "
                              f"{', '.join(loaded.keys())}")
        loaded = loaded[split]
    elif split != "train":
        raise RecipeError(f"data.{what}: {source} is a single dataset without splits; use split: train")
    return [{**row, "_where": f"{source}[{split}] row {index}"} for index, row in enumerate(loaded)]


def load_rows(data: DataSection) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, source name) of ``data.dataset`` without the model or tokenizer."""
    source = str(data.dataset)
    rows = read_split(source, data.split, data)
    if data.eval_split is not None:
        return rows, read_split(source, data.eval_split, data, "eval_split"), f"dataset {source}"
    if data.eval_dataset is not None:
        return rows, read_split(str(data.eval_dataset), data.split, data, option="eval_dataset"), f"dataset {source}"
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(data.seed)).tolist()
    held_out = min(data.n_eval, len(rows) // 2)
    return [rows[i] for i in order[held_out:]], [rows[i] for i in order[:held_out]], f"dataset {source}"


def _field(row: dict, name: str, option: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in row:
        columns = ", ".join(k for k in row if k != "_where")
        raise RecipeError(f"data.{option}: {row['_where']} has no field {name!r}; its fields: {columns}")
    value = row[name]
    if not isinstance(value, kind):
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RecipeError(f"data.{option}: {row['_where']} field {name!r} must be a {kinds}, "
                          f"got {type(value).__name__}")
    return value


def check_messages(messages: list, where: str) -> None:
    """A chat must be {role, content} messages ending with the assistant's (the target)."""
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise RecipeError(f"data.messages_field: {where} must be a list of {{role, content}} messages")
    if messages[-1]["role"] != "assistant":
        raise RecipeError(f"data.messages_field: {where}: the last message must be the assistant's (the target), "
                          f"got role {messages[-1]['role']!r}")


def render_messages(messages: list, tokenizer: Any, where: str) -> TrainingText:
    """A chat as (everything up to the last assistant turn, that turn), rendered by the chat template."""
    check_messages(messages, where)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RecipeError("data.messages_field: the tokenizer has no chat template to render messages with")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise RecipeError(f"data.messages_field: {where}: the chat template renders the conversation without its "
                          f"generation prompt as a prefix, so the assistant's turn can't be cut out")
    return TrainingText(prompt, full[len(prompt):], add_special_tokens=False)


def check_data_source(data: DataSection) -> list[str]:
    """The problems of a recipe's data that show without the model or tokenizer: the task must exist and take
    its kwargs; the dataset (and eval_dataset) must load and every row must have the fields named; the same
    for every ``mix`` source."""
    problems = check_one_source(data)
    for index, section in enumerate(mixed_sections(data)):
        problems += [f"data.mix.{index}: {p}" for p in check_one_source(section)]
    return problems


def check_one_source(data: DataSection) -> list[str]:
    if data.task is not None:
        try:
            make_task(data.task, data.task_kwargs).examples(1, data.seed)
        except RecipeError as err:
            return [str(err)]
        return []
    problems = [f"data.data_files: {f} does not exist" for f in data.data_files or []
                if not any(ch in f for ch in "*?[") and not Path(f).exists()]
    sources = [("dataset", str(data.dataset), data.split, "split")]
    if data.eval_split is not None:
        sources.append(("dataset", str(data.dataset), data.eval_split, "eval_split"))
    if data.eval_dataset is not None:
        sources.append(("eval_dataset", str(data.eval_dataset), data.split, "split"))
    for option, source, split, what in sources:
        try:
            rows = read_split(source, split, data, what, option)
            if data.messages_field is None:
                rows_to_texts(rows, data, None, source)
            for row in rows if data.messages_field is not None else []:
                check_messages(_field(row, data.messages_field, "messages_field", list), row["_where"])
        except RecipeError as err:
            problems.append(str(err))
    return problems


def rows_to_texts(rows: list[dict], data: DataSection, tokenizer: Any, source: str) -> list[TrainingText]:
    """One `TrainingText` per row, by the data section's fields."""
    answer_end = "eos" if data.answer_end == "auto" else data.answer_end
    texts = []
    for row in rows:
        if data.text_field is not None:
            texts.append(TrainingText("", _field(row, data.text_field, "text_field"), eos=True, pack=data.packing))
        elif data.messages_field is not None:
            texts.append(render_messages(_field(row, data.messages_field, "messages_field", list), tokenizer,
                                         row["_where"]))
        else:
            prompt = _field(row, data.prompt_field, "prompt_field")
            answer = str(_field(row, data.answer_field, "answer_field", (str, int, float)))
            texts += texts_from_examples([Example(prompt, answer)], "", answer_end)
    return texts
