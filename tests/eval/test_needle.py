"""Needle in a haystack: real text, context length respected, needle at the requested depth, seeded."""

import pytest

from graftlm.eval.needle import NEEDLE, PREFIX, SUFFIX, NeedleTask, SimpleTokenizer, corpus_words


def _haystack(prompt):
    assert prompt.startswith(PREFIX) and prompt.endswith(SUFFIX)
    return prompt[len(PREFIX) : -len(SUFFIX)]


def test_corpus_is_sizeable_real_english():
    words, sources = corpus_words()
    assert len(words) >= 20_000 and sources
    text = " ".join(words[:5000]).lower()
    for common in (" the ", " and ", " of ", " to "):
        assert common in text


@pytest.mark.parametrize("context_length", [256, 600, 1500])
def test_prompt_fits_the_context_length_in_real_tokenizer_tokens(byte_tokenizer, context_length):
    task = NeedleTask(context_length=context_length, tokenizer=byte_tokenizer)
    for example in task.examples(5, seed=0):
        length = len(byte_tokenizer(example.prompt)["input_ids"])
        assert length == example.meta["prompt_tokens"]
        assert context_length - 12 <= length <= context_length  # a byte tokenizer: one word's worth of slack


@pytest.mark.parametrize("context_length", [300, 2000])
def test_prompt_fits_the_context_length_in_simple_pieces(context_length):
    for example in NeedleTask(context_length=context_length).examples(5, seed=1):
        length = SimpleTokenizer().count(example.prompt)
        assert context_length - 40 <= length <= context_length


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_is_present_once_at_the_requested_depth(depth):
    task = NeedleTask(context_length=2000, depth=depth)
    for example in task.examples(4, seed=2):
        needle = NEEDLE.format(passkey=example.answer)
        haystack = _haystack(example.prompt)
        assert haystack.count(needle) == 1 and example.prompt.count(example.answer) == 1
        before = haystack.index(needle)
        relative = before / (len(haystack) - len(needle))
        assert abs(relative - depth) <= 0.07, (relative, depth)
        assert len(example.answer) == 5 and example.answer.isdigit()


def test_default_depths_spread_over_examples_and_are_reported():
    task = NeedleTask(context_length=300, num_depths=3)
    examples = task.examples(6, seed=0)
    assert [e.meta["depth"] for e in examples] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert task.breakdown_keys == ("depth",)


def test_seeded_and_different_across_seeds():
    task = NeedleTask(context_length=300)
    assert task.examples(4, seed=5) == task.examples(4, seed=5)
    assert [e.answer for e in task.examples(4, seed=5)] != [e.answer for e in task.examples(4, seed=6)]


def test_too_short_a_context_is_refused():
    with pytest.raises(ValueError, match="too short"):
        NeedleTask(context_length=10).examples(1, seed=0)
