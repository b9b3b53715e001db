"""Batched greedy generation with left padding, newline stops, and exact-match scoring of known outputs."""

import torch

from graftlm.eval.generate import generate_all, generate_batch
from graftlm.eval.runner import evaluate
from graftlm.eval.tasks import Example, Task

PROMPTS = ["k=1 x", "a much longer prompt, with more bytes in it = ", "mid-size prompt:", "z"]


def test_left_padded_batches_match_one_at_a_time_generation(tiny_llama, byte_tokenizer):
    for stop_at_newline in (False, True):
        batched = generate_batch(tiny_llama, byte_tokenizer, PROMPTS, max_new_tokens=12,
                                 stop_at_newline=stop_at_newline)
        single = [generate_batch(tiny_llama, byte_tokenizer, [p], max_new_tokens=12,
                                 stop_at_newline=stop_at_newline)[0] for p in PROMPTS]
        assert batched == single
        assert byte_tokenizer.padding_side == "left"
    assert len(set(batched)) > 1  # the prompts really lead to different continuations


def test_generate_all_keeps_prompt_order_across_batches(tiny_llama, byte_tokenizer):
    expected = generate_batch(tiny_llama, byte_tokenizer, PROMPTS, max_new_tokens=6)
    assert generate_all(tiny_llama, byte_tokenizer, PROMPTS, 6, batch_size=3, progress=False) == expected


class CannedModel:
    """A stand-in model whose ``generate`` appends a fixed reply per prompt (read from left-padded ids)."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append(input_ids.shape)
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left padded"
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = self.tokenizer(self.replies[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + reply)
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


class SumTask(Task):
    name = "sums"

    def examples(self, n, seed):
        return [Example(f"{i}+{seed}=", str(i + seed), {"parity": i % 2}) for i in range(n)]


def test_scoring_of_known_outputs_gives_the_expected_accuracy(byte_tokenizer):
    task = SumTask()
    examples = task.examples(8, seed=3)
    # right for even i (including a reply that runs on past a newline), wrong for odd i
    replies = {e.prompt: (f" {e.answer}\n99" if i % 2 == 0 else f" {int(e.answer) + 1}") for i, e in
               enumerate(examples)}
    model = CannedModel(byte_tokenizer, replies)
    result = evaluate(model, byte_tokenizer, task, n=8, seed=3, batch_size=3, max_new_tokens=8, progress=False)
    assert result["accuracy"] == 0.5 and result["num_correct"] == 4 and result["n"] == 8
    assert [r["correct"] for r in result["records"]] == [i % 2 == 0 for i in range(8)]
    assert result["records"][0]["completion"] == " 3" and result["records"][1]["prediction"] == "5"
    assert [shape[0] for shape in model.calls] == [3, 3, 2]


def test_evaluate_gives_needle_the_models_tokenizer_and_breaks_down_by_depth(tiny_llama, byte_tokenizer):
    result = evaluate(tiny_llama, byte_tokenizer, "needle", {"context_length": 300, "num_depths": 2}, n=2,
                      batch_size=2, progress=False)
    assert result["task_params"]["length_unit"] == "tokenizer tokens"
    assert all(r["meta"]["prompt_tokens"] <= 300 for r in result["records"])
    assert set(result["breakdown"]["depth"]) == {"0.0", "1.0"}
    assert "tokenizer" not in result["task_kwargs"]
