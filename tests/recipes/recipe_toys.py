"""Helpers of the recipes tests: a character tokenizer for the tiny random models and toy recipes."""

from __future__ import annotations

import copy
from typing import Any

from graftlm.recipes.config import build_recipe
from graftlm.recipes.data import Example

PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """Maps each character to one id in [3, 128): enough of a tokenizer for a vocab-128 tiny model."""

    pad_token_id = PAD
    eos_token_id = EOS
    bos_token_id = BOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ord(ch) % 125 for ch in text]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


def toy_examples(n: int, answer: str = "ok", ragged: bool = False) -> list[Example]:
    """Prompts of letters, each answered with the same string: learnable by a bias alone."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    examples = []
    for i in range(n):
        length = 3 + (i % 4 if ragged else 0)
        prompt = "".join(letters[(i * 7 + j * 3) % 26] for j in range(length)) + "="
        examples.append(Example(prompt, answer * (1 + (i % 5) * 2) if ragged else answer))
    return examples


def toy_recipe(tmp_path, **sections: Any):
    """A valid recipe for a tiny model; ``sections`` are merged into the raw mapping (dotted keys allowed)."""
    raw: dict[str, Any] = {
        "model": {"name": "tiny-llama"},
        "graft": {"type": "test_ffn_bias"},
        "data": {"dataset": "unused.jsonl", "max_length": 32},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "progress_bar": False, "schedule": "constant"},
        "output_dir": str(tmp_path / "run"),
    }
    raw = copy.deepcopy(raw)
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return build_recipe(raw)
