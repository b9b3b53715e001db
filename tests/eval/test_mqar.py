"""MQAR: seeded, parameters respected, answers correct by construction (checked by parsing prompts back)."""

import re

import pytest
import torch

from graftlm.eval.mqar import FILLER_WORDS, KEY_WORDS, MQARTask, mqar_token_sequences


def parse_mqar_prompt(prompt):
    """Reads a rendered prompt back into (pairs dict, answered queries dict, open key, filler words)."""
    lines = dict(line.split(": ", 1) for line in prompt.splitlines()[1:])
    pairs = dict(item.split("=") for item in lines["Pairs"].split())
    *answered, open_query = lines["Recall"].split()
    filler = lines.get("Notes", "").split()
    assert open_query.endswith("=")
    return pairs, dict(item.split("=") for item in answered), open_query[:-1], filler


@pytest.mark.parametrize("num_pairs, num_queries, gap", [(1, 1, 0), (4, 2, 0), (8, 4, 16), (32, 8, 100)])
def test_prompts_parse_back_to_their_answers(num_pairs, num_queries, gap):
    task = MQARTask(num_pairs=num_pairs, num_queries=num_queries, gap=gap)
    for example in task.examples(20, seed=3):
        pairs, answered, key, filler = parse_mqar_prompt(example.prompt)
        assert len(pairs) == num_pairs and len(answered) == num_queries - 1 and len(filler) == gap
        assert example.answer == pairs[key]
        assert all(pairs[k] == v for k, v in answered.items())
        assert key not in answered
        assert len(set(pairs.values())) == num_pairs
        assert all(re.fullmatch(r"[1-9]\d", v) for v in pairs.values())
        assert example.meta["pair_index"] == list(pairs).index(key)


def test_seeded_and_different_across_seeds():
    task = MQARTask(num_pairs=6, num_queries=3, gap=8)
    assert task.examples(10, seed=1) == task.examples(10, seed=1)
    assert [e.prompt for e in task.examples(10, seed=1)] != [e.prompt for e in task.examples(10, seed=2)]


def test_key_and_filler_vocabularies_are_disjoint_and_distinct():
    assert not set(KEY_WORDS) & set(FILLER_WORDS)
    assert len(set(KEY_WORDS)) == len(KEY_WORDS) and len(set(FILLER_WORDS)) == len(FILLER_WORDS)


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="num_queries"):
        MQARTask(num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="num_pairs"):
        MQARTask(num_pairs=91, value_digits=2)
    with pytest.raises(ValueError, match="gap"):
        MQARTask(gap=-1)


def test_answer_extraction_reads_the_first_number():
    task = MQARTask()
    assert task.is_correct(task.extract_answer("42 apple=17"), "42")
    assert not task.is_correct(task.extract_answer("4"), "42")


def test_token_sequences_put_labels_on_the_recalled_values():
    input_ids, labels = mqar_token_sequences(n=5, num_pairs=6, num_queries=3, gap=4, key_vocab=10, value_vocab=12,
                                             seed=7)
    assert input_ids.shape == labels.shape == (5, 2 * 6 + 4 + 2 * 3)
    for row, row_labels in zip(input_ids.tolist(), labels.tolist()):
        pairs = dict(zip(row[0:12:2], row[1:12:2]))
        assert all(1 <= k <= 10 for k in pairs) and all(11 <= v <= 22 for v in pairs.values())
        assert row[12:16] == [0, 0, 0, 0]
        queries = row[16::2]
        assert len(set(queries)) == 3 and all(row[16 + 2 * i + 1] == pairs[q] for i, q in enumerate(queries))
        supervised = [i for i, label in enumerate(row_labels) if label != -100]
        assert supervised == [17, 19, 21] and all(row_labels[i] == row[i] for i in supervised)
    again, _ = mqar_token_sequences(n=5, num_pairs=6, num_queries=3, gap=4, key_vocab=10, value_vocab=12, seed=7)
    assert torch.equal(input_ids, again)
