"""Batched greedy generation with left padding, stopping each row at a newline or end of sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Returns ``tokenizer`` set to pad on the left, with the end-of-sequence token as pad if it had none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class NewlineStop:
    """A per-row stopping criterion: a row is done once its new tokens decode to text with a newline."""

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in text for text in texts], dtype=torch.bool, device=input_ids.device)


def model_device(model: Any) -> torch.device:
    """Returns the device of the model's first parameter (CPU for parameter-less stubs)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(config) if isinstance(config, (list, tuple)) else [config] if config is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   stop_at_newline: bool = True) -> list[str]:
    """Returns the greedy completions of ``prompts`` (one forward batch, left padded), each cut at its
    first newline when ``stop_at_newline``; special tokens are dropped."""
    prepare_tokenizer(tokenizer)
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = model_device(model)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    prompt_length = input_ids.shape[1]
    kwargs: dict[str, Any] = {}
    if stop_at_newline:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([NewlineStop(tokenizer, prompt_length)])
    eos = _eos_ids(model, tokenizer)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=eos or None, **kwargs)
    sequences = output.sequences if hasattr(output, "sequences") else output
    texts = tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return [text.split("\n", 1)[0] if stop_at_newline else text for text in texts]


def generate_all(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
                 stop_at_newline: bool = True, progress: bool = True, description: str = "generating") -> list[str]:
    """Returns the greedy completions of all ``prompts`` in their order, generated in batches of similar
    length (longest first) under a tqdm progress bar."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    completions: list[str | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=description, disable=not progress, unit="ex") as bar:
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            texts = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, stop_at_newline)
            for index, text in zip(chunk, texts):
                completions[index] = text
            bar.update(len(chunk))
    return completions  # type: ignore[return-value]
