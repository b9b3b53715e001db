"""Training text -> tokenized `datasets.Dataset`: the loss on exactly the tokens the model must generate.

An example is a `TrainingText`: what the model reads (``prompt``) and what it must write after it
(``completion``). The two are tokenized **together**, as one text, so the ids are the tokenization of the
full text, exactly what the model sees when it reads its own answer back; labels are -100 on every token
that ends inside the prompt, so the loss counts only the completion's tokens (a token is labelled when its
character span ends past the prompt). With a tokenizer that gives no character offsets, the prompt's own
ids must be a prefix of the full text's ids, else a `RecipeError` names the example.

How a completion ends (``answer_end``, one documented policy): ``"newline"`` for tasks that are scored up
to the first newline (the few-shot prompts continue "Answer: 5\\n\\nQuestion: ..."; the eval stops there),
``"eos"`` (the tokenizer's EOS token) for datasets, ``"none"`` for neither.

Plain language-model text (``prompt=""``) is labelled on every token; `pack_texts` concatenates texts
(each ending in EOS) and cuts them into blocks of ``max_length`` tokens, as language-model pre-training does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from graftlm.recipes.config import RecipeError

IGNORE_INDEX = -100
AnswerEnd = Literal["newline", "eos", "none"]


@runtime_checkable
class PromptAnswer(Protocol):
    """What training needs of a (prompt, answer) example: the text shown and the exact text to produce."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TrainingText:
    """One training example: ``prompt`` (read, not scored) then ``completion`` (scored).

    ``context``: the text that follows the completion in its source; it is tokenized with it (so the
    completion's last token is the one running text has) and then cut off, never trained on.
    ``add_special_tokens``: let the tokenizer add its own special tokens (Gemma's ``<bos>``); False for text
    already rendered by a chat template, which carries them. ``eos``: end with the tokenizer's EOS id.
    ``pack``: plain text to be packed into blocks with the other packed texts (a source with ``packing``).
    """

    prompt: str
    completion: str
    add_special_tokens: bool = True
    eos: bool = False
    context: str = ""
    pack: bool = False


def completion_text(answer: str, prefix: str = "", answer_end: AnswerEnd = "eos") -> tuple[str, bool]:
    """(completion text, EOS flag) for ``answer`` after ``prefix`` under the ``answer_end`` policy."""
    if answer_end not in ("newline", "eos", "none"):
        raise RecipeError(f"data.answer_end: must be newline, eos or none, got {answer_end!r}")
    return prefix + answer + ("\n" if answer_end == "newline" else ""), answer_end == "eos"


def texts_from_examples(examples: Iterable[PromptAnswer], prefix: str = "", answer_end: AnswerEnd = "eos",
                        context: str = "") -> list[TrainingText]:
    """`TrainingText`s of (prompt, answer) examples: ``prompt + prefix + answer`` and the ending; ``context``
    (what follows a newline ending in the source) is kept only with ``answer_end="newline"``."""
    texts = []
    for example in examples:
        completion, eos = completion_text(example.answer, prefix, answer_end)
        texts.append(TrainingText(example.prompt, completion, eos=eos,
                                  context=context if answer_end == "newline" else ""))
    return texts


def as_training_texts(examples: Sequence[Any], answer_end: AnswerEnd = "eos") -> list[TrainingText]:
    """``examples`` unchanged when they are `TrainingText`s; (prompt, answer) examples joined as written."""
    if all(isinstance(e, TrainingText) for e in examples):
        return list(examples)
    return texts_from_examples(examples, "", answer_end)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, offsets: bool) -> dict[str, list]:
    if offsets:
        try:
            return tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        except (TypeError, NotImplementedError, ValueError):
            pass
    return tokenizer(text, add_special_tokens=add_special_tokens)


def encode_text(tokenizer: Any, text: TrainingText) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, clean boundary) of one example: the full text tokenized once.

    ``clean boundary`` is False when a token straddles the prompt / completion boundary (the prompt alone
    tokenizes differently from the start of the full text: generation from that prompt would start from
    other ids than training saw). Raises `RecipeError` when that can't be told (no offsets, no prefix).
    """
    full = text.prompt + text.completion
    boundary, end_of_completion = len(text.prompt), len(full)
    encoded = _encode(tokenizer, full + text.context, text.add_special_tokens, offsets=True)
    offsets = encoded.get("offset_mapping") if hasattr(encoded, "get") else None
    if offsets is not None:
        kept = []
        for token, span in zip(encoded["input_ids"], offsets):
            if span[0] >= end_of_completion and span[1] > span[0]:
                break  # the first token of the context: the rest is cut off
            kept.append((token, span))
        ids = [token for token, _ in kept]
        labels = [token if end > boundary else IGNORE_INDEX for token, (_, end) in kept]
        clean = not any(start < boundary < end for _, (start, end) in kept)
    else:
        ids = list(_encode(tokenizer, full, text.add_special_tokens, offsets=False)["input_ids"])
        prompt_ids = list(_encode(tokenizer, text.prompt, text.add_special_tokens, offsets=False)["input_ids"])
        if ids[: len(prompt_ids)] != prompt_ids:
            raise RecipeError(f"data: the tokenizer gives no character offsets and the prompt's ids are not a "
                              f"prefix of the full text's ids, so the answer tokens can't be told apart: "
                              f"{full[-80:]!r}")
        labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
        clean = True
    if text.eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels, clean


def tokenize_texts(texts: Iterable[TrainingText], tokenizer: Any, max_length: int, what: str = "training set"):
    """A `datasets.Dataset` with ``input_ids`` and ``labels`` (-100 outside the completion).

    Drops (with a warning) examples longer than ``max_length`` or with nothing to learn, warns about
    examples whose prompt / completion boundary falls inside a token, and raises `RecipeError` when nothing
    is left.
    """
    from datasets import Dataset

    input_ids, labels = [], []
    total = straddling = 0
    for text in texts:
        total += 1
        ids, targets, clean = encode_text(tokenizer, text)
        straddling += not clean
        if len(ids) > max_length or all(t == IGNORE_INDEX for t in targets):
            continue
        input_ids.append(ids)
        labels.append(targets)
    if total and not input_ids:
        raise RecipeError(f"data: no example of the {what} fits max_length={max_length} tokens")
    if not input_ids:
        raise RecipeError(f"data: the {what} is empty")
    if len(input_ids) < total:
        warnings.warn(f"{total - len(input_ids)} of {total} examples of the {what} are longer than "
                      f"max_length={max_length} tokens (or have an empty answer) and were dropped", stacklevel=2)
    if straddling:
        warnings.warn(f"{straddling} of {total} examples of the {what} have a token that straddles the end of the "
                      f"prompt: generation from the prompt alone starts from other ids than training", stacklevel=2)
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def tokenize_examples(examples: Iterable[PromptAnswer], tokenizer: Any, max_length: int,
                      answer_end: AnswerEnd = "eos", what: str = "training set"):
    """`tokenize_texts` of (prompt, answer) examples joined as written (``prompt + answer``)."""
    return tokenize_texts(as_training_texts(list(examples), answer_end), tokenizer, max_length, what)


def pack_texts(texts: Iterable[str], tokenizer: Any, max_length: int, what: str = "training set"):
    """Plain text as language-model blocks: every text tokenized (with the tokenizer's special tokens) and
    ended with EOS, all concatenated and cut into blocks of exactly ``max_length`` tokens (the last partial
    block dropped); labels are the ids. Raises `RecipeError` when the texts don't fill one block."""
    from datasets import Dataset

    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        stream += list(tokenizer(text, add_special_tokens=True)["input_ids"]) + eos
    blocks = [stream[i:i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    if not blocks:
        raise RecipeError(f"data: the {what} has {len(stream)} tokens, fewer than one block of "
                          f"max_length={max_length}")
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


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
