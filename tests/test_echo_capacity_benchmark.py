"""`benchmarks/echo_capacity.py` measures what it names: below the rank every pair comes back, far above it
recall falls towards chance, and filler tokens cost recall."""

import pytest
from graft_fixtures import load_benchmark


@pytest.fixture(scope="module")
def capacity():
    return load_benchmark("echo_capacity")


def test_pairs_up_to_the_rank_are_recalled_exactly(capacity):
    right, total = capacity.recall_accuracy(rank=8, pairs=8, heads=1, gap=0, trials=20)
    assert (right, total) == (160, 160)


def test_far_more_pairs_than_rank_fall_towards_chance(capacity):
    right, total = capacity.recall_accuracy(rank=2, pairs=48, heads=1, gap=0, trials=20)
    assert 1 / 48 <= right / total < 0.3


def test_filler_tokens_cost_recall_and_more_heads_win_it_back(capacity):
    one = capacity.recall_accuracy(rank=4, pairs=8, heads=1, gap=64, trials=40)
    clean = capacity.recall_accuracy(rank=4, pairs=8, heads=1, gap=0, trials=40)
    many = capacity.recall_accuracy(rank=4, pairs=8, heads=9, gap=64, trials=40)
    assert one[0] < clean[0] and one[0] < many[0]

