"""`benchmarks/echo_learn_mqar.py` measures what it names: the task asks for the value a key had in the context,
every mixer sees only the tokens before its chunk, and a trained mixer's accuracy is read on held-out rows."""

import argparse

import pytest
import torch
from graft_fixtures import load_benchmark


@pytest.fixture(scope="module")
def toy():
    return load_benchmark("echo_learn_mqar")


def args(**over):
    values = {"dim": 16, "heads": 2, "rank": 4, "value_dim": 4, "chunk_size": 4, "lr": 1e-3, "batch_size": 4, "steps": 3, "ladder": [3],
                  "feature_seed": 0}
    return argparse.Namespace(**{**values, **over})


def test_each_answer_position_is_a_repeated_key_followed_by_its_context_value(toy):
    task = toy.Task(pairs=5, gap=7)
    tokens, answer = task.sample(3, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 2 * 5 + 7 + 2 * 5) and answer.sum() == 3 * 5
    for row, marks in zip(tokens, answer):
        context = dict(zip(row[:10:2].tolist(), row[1:10:2].tolist()))
        assert len(context) == 5  # keys drawn without replacement
        for pos in marks.nonzero().flatten().tolist():
            assert row[pos].item() in context and row[pos + 1].item() == context[row[pos].item()]
        assert (row[10:17] >= toy.N_KEYS + toy.N_VALUES).all()  # the gap is filler only


@pytest.mark.parametrize("system", ["echo, W_o random", "softmax attention"])
def test_mixers_see_nothing_of_their_own_chunk(toy, system):
    mixer = toy.SYSTEMS[system](args())
    torch.nn.init.normal_(mixer.branch.w_o.weight)
    x = torch.randn(2, 12, 16)
    out = mixer(x)
    assert out[:, :4].abs().max() == 0  # the first chunk reads nothing
    changed = x.clone()
    changed[:, 8:] += 1.0  # the last chunk: the earlier chunks' outputs cannot move
    assert torch.equal(mixer(changed)[:, :8], out[:, :8])


def test_graft_like_echo_starts_silent_and_trains_only_the_mixer(toy):
    a = args()
    assert toy.SYSTEMS["echo"](a)(torch.randn(1, 12, 16)).abs().max() == 0  # W_o = 0, as the graft
    task = toy.Task(pairs=3, gap=4)
    held_out = task.sample(8, torch.Generator().manual_seed(1))
    rows = toy.train_one("echo, W_o random", 0, a, task, held_out)
    assert [r["step"] for r in rows] == [3] and rows[0]["total"] == 8 * 3 and 0 <= rows[0]["accuracy"] <= 1
    features = toy.Features(16, torch.Generator().manual_seed(0))
    assert not any(p.requires_grad for p in features.parameters())
