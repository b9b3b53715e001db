"""Needle in a haystack over real English text: a passkey sentence hidden at a depth of a long context.

Prompt::

    Read the text below and remember the secret passkey hidden in it.

    <real text ... The secret passkey is 48213. Remember it. ... real text>

    Question: What is the secret passkey hidden in the text above?
    Answer: The secret passkey is

``context_length`` is the whole prompt's length in tokens of the tokenizer given (special tokens
included), never exceeded and usually within a few tokens; without a tokenizer a simple word-and-
punctuation count stands in. ``depth`` is the fraction of the text before the needle (0 = start, 1 = end);
the needle is moved to the nearest sentence end close by.

The text is the first sizeable English found, in order: the licence texts in /usr/share/common-licenses
(Debian's base-files), Python's pydoc topics (``pydoc_data``), then docstrings of the standard library.
"""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Callable
from typing import Any

from graftlm.eval.tasks import Example, Task, register_task

LICENSES_DIR = "/usr/share/common-licenses"
PREFIX = "Read the text below and remember the secret passkey hidden in it.\n\n"
SUFFIX = "\n\nQuestion: What is the secret passkey hidden in the text above?\nAnswer: The secret passkey is"
NEEDLE = "The secret passkey is {passkey}. Remember it."


def _license_texts() -> list[tuple[str, str]]:
    """Returns (source name, text) for each distinct file of /usr/share/common-licenses."""
    if not os.path.isdir(LICENSES_DIR):
        return []
    seen, out = set(), []
    for name in sorted(os.listdir(LICENSES_DIR)):
        path = os.path.realpath(os.path.join(LICENSES_DIR, name))
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        with open(path, encoding="utf-8", errors="ignore") as handle:
            out.append((path, handle.read()))
    return out


def _pydoc_topics() -> list[tuple[str, str]]:
    """Returns (source name, text) for Python's pydoc topics, or nothing if ``pydoc_data`` is missing."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [("pydoc_data.topics", "\n\n".join(topics[key] for key in sorted(topics)))]


def _stdlib_docstrings() -> list[tuple[str, str]]:
    """Returns (source name, text) of the docstrings of a few always-present standard-library modules."""
    import argparse
    import collections
    import inspect
    import json
    import pathlib

    texts = []
    for module in (argparse, collections, json, pathlib, inspect, os, random, re):
        docs = [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module)]
        texts.append((f"docstrings of {module.__name__}", "\n\n".join([module.__doc__ or ""] + docs)))
    return texts


TEXT_SOURCES: tuple[Callable[[], list[tuple[str, str]]], ...] = (_license_texts, _pydoc_topics, _stdlib_docstrings)


@functools.lru_cache(maxsize=8)
def corpus_words(min_words: int = 20_000) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Returns (words of the corpus, names of the sources used), taking sources in order until at least
    ``min_words`` whitespace-separated words are gathered (or all sources are used)."""
    words: list[str] = []
    used: list[str] = []
    for source in TEXT_SOURCES:
        for name, text in source():
            words.extend(text.split())
            used.append(name)
        if len(words) >= min_words:
            break
    if not words:
        raise RuntimeError("no English text found for the needle haystack")
    return tuple(words), tuple(used)


class SimpleTokenizer:
    """A stand-in for counting tokens when no tokenizer is given: words and punctuation marks."""

    _PIECE = re.compile(r"\w+|[^\w\s]")

    def count(self, text: str) -> int:
        """Returns the number of word and punctuation pieces in ``text``."""
        return len(self._PIECE.findall(text))


def token_counter(tokenizer: Any | None) -> Callable[[str], int]:
    """Returns a function giving the length of a prompt in ``tokenizer``'s tokens (special tokens
    included), or in ``SimpleTokenizer`` pieces when ``tokenizer`` is None."""
    if tokenizer is None:
        return SimpleTokenizer().count
    return lambda text: len(tokenizer(text)["input_ids"])


def _is_sentence_end(word: str) -> bool:
    return word.endswith((".", "?", "!", ";"))


def needle_position(words: list[str], depth: float) -> int:
    """Returns where to insert the needle in ``words``: the word index at ``depth``, moved to the nearest
    sentence end within a window of 5% of the text (at least 3 words)."""
    target = round(depth * len(words))
    window = max(3, len(words) // 20)
    for offset in range(window + 1):
        for index in (target - offset, target + offset):
            if 0 < index < len(words) and _is_sentence_end(words[index - 1]):
                return index
    return target


def _window(words: tuple[str, ...], start: int, count: int) -> list[str]:
    """Returns ``count`` words of ``words`` from ``start``, wrapping around the end."""
    return [words[(start + i) % len(words)] for i in range(count)]


def build_prompt(haystack_words: list[str], passkey: str, depth: float) -> tuple[str, str]:
    """Returns (prompt, haystack text with the needle) for the given haystack words, passkey and depth."""
    index = needle_position(haystack_words, depth)
    needle = NEEDLE.format(passkey=passkey)
    text = " ".join(haystack_words[:index] + [needle] + haystack_words[index:])
    return PREFIX + text + SUFFIX, text


def fit_prompt(words: tuple[str, ...], start: int, context_length: int, passkey: str, depth: float,
               count: Callable[[str], int]) -> tuple[str, int]:
    """Returns (prompt, its length) for the longest haystack from ``start`` whose prompt fits in
    ``context_length`` tokens, found by binary search on the number of words."""
    low, high = 0, max(1, context_length)
    best = None
    while low <= high:
        middle = (low + high) // 2
        prompt, _ = build_prompt(_window(words, start, middle), passkey, depth)
        length = count(prompt)
        if length <= context_length:
            best, low = (prompt, length), middle + 1
        else:
            high = middle - 1
    if best is None:
        raise ValueError(f"context_length {context_length} is too short for the needle prompt itself")
    return best


class NeedleTask(Task):
    """Passkey retrieval from real text at one context length; depths given or spread over the examples."""

    name = "needle"
    breakdown_keys = ("depth",)

    def __init__(self, context_length: int = 512, depth: float | None = None, num_depths: int = 5,
                 passkey_digits: int = 5, tokenizer: Any = None):
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        if num_depths < 1 or passkey_digits < 1:
            raise ValueError("num_depths and passkey_digits must be >= 1")
        self.context_length, self.depth, self.num_depths = context_length, depth, num_depths
        self.passkey_digits, self.tokenizer = passkey_digits, tokenizer
        self.max_new_tokens = passkey_digits + 3

    def depths(self) -> list[float]:
        """Returns the depths the examples cycle through."""
        if self.depth is not None:
            return [self.depth]
        if self.num_depths == 1:
            return [0.5]
        return [round(i / (self.num_depths - 1), 4) for i in range(self.num_depths)]

    def params(self) -> dict:
        """Returns the task's parameters and the text sources used."""
        return {"context_length": self.context_length, "depth": self.depth, "depths": self.depths(),
                "passkey_digits": self.passkey_digits, "text_sources": list(self._corpus()[1]),
                "length_unit": "tokenizer tokens" if self.tokenizer is not None else "simple word pieces"}

    def _corpus(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # a token is at most one word here, so this many words never forces the haystack to wrap around
        return corpus_words(max(20_000, self.context_length))

    def examples(self, n: int, seed: int) -> list[Example]:
        """Returns ``n`` needle prompts, identical for the same ``seed`` (and tokenizer)."""
        words, _ = self._corpus()
        count = token_counter(self.tokenizer)
        rng = random.Random(f"needle-{seed}")
        depths = self.depths()
        out = []
        for index in range(n):
            depth = depths[index % len(depths)]
            passkey = str(rng.randrange(10 ** (self.passkey_digits - 1), 10**self.passkey_digits))
            start = rng.randrange(len(words))
            for _ in range(len(words)):
                if _is_sentence_end(words[(start - 1) % len(words)]):
                    break
                start = (start + 1) % len(words)
            prompt, length = fit_prompt(words, start, self.context_length, passkey, depth, count)
            out.append(Example(prompt, passkey, {"depth": depth, "context_length": self.context_length,
                                                 "prompt_tokens": length, "start_word": start}))
        return out


register_task("needle")(NeedleTask)
