"""Recipe data from Hugging Face `datasets` sources, offline: local dataset directories, builders with data
files, plain text with packing, chat messages; errors name the missing field or split."""

import json

import pytest
from recipe_toys import CharTokenizer

from graftlm.recipes.config import RecipeError, build_recipe
from graftlm.recipes.data import IGNORE_INDEX, pack_texts, tokenize_texts
from graftlm.recipes.sources import load_training_data

MINIMAL = {"model": {"name": "tiny"}, "graft": {"type": "lora"}}


def _data(**values):
    return build_recipe({**MINIMAL, "data": values}).data


@pytest.fixture
def saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"question": [f"Q{i}: 2+{i}?" for i in range(12)], "answer": [f" {2 + i}" for i in range(12)]}
    path = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict({k: v[:3] for k, v in rows.items()})}
                ).save_to_disk(str(path))
    return path


def test_saved_dataset_with_named_fields_and_eval_split(saved_dataset):
    train, held_out = load_training_data(_data(dataset=str(saved_dataset), prompt_field="question",
                                               eval_split="test"))
    assert (len(train), len(held_out)) == (12, 3)
    assert (train[0].prompt, train[0].completion, train[0].eos) == ("Q0: 2+0?", " 2", True)


def test_missing_field_and_split_are_named(saved_dataset):
    with pytest.raises(RecipeError, match=r"data.prompt_field: .*\[train\] row \d+ has no field 'prompt'; "
                                          r"its fields: question, answer"):
        load_training_data(_data(dataset=str(saved_dataset)))
    with pytest.raises(RecipeError, match=r"data.split: 'validation' is not a split of .*; its splits: train, test"):
        load_training_data(_data(dataset=str(saved_dataset), prompt_field="question", split="validation"))
    with pytest.raises(RecipeError, match=r"data.dataset: cannot load .*no-such-dataset"):
        load_training_data(_data(dataset="no-such-dataset/at-all"))


def test_json_builder_with_data_files_and_held_out_rows(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}=", "answer": str(i)}) for i in range(10)))
    train, held_out = load_training_data(_data(dataset="json", data_files=[str(path)], n_eval=2, answer_end="none"))
    assert (len(train), len(held_out)) == (8, 2)
    assert {t.prompt + t.completion for t in train + held_out} == {f"p{i}={i}" for i in range(10)}
    assert not any(t.eos for t in train)


def test_plain_text_is_packed_into_full_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line number {i} of a small corpus" for i in range(40)))
    data = _data(dataset="text", data_files=[str(path)], text_field="text", packing=True, max_length=16, n_eval=4)
    train, held_out = load_training_data(data)
    assert len(train) == 36 and len(held_out) == 4 and train[0].prompt == ""
    blocks = pack_texts([t.completion for t in train], CharTokenizer(), 16)
    assert all(len(row) == 16 for row in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]
    stream = [i for t in train for i in CharTokenizer()(t.completion)["input_ids"] + [CharTokenizer.eos_token_id]]
    assert [i for row in blocks["input_ids"] for i in row] == stream[: 16 * len(blocks)]
    with pytest.raises(RecipeError, match="data.packing: applies to plain text only"):
        _data(dataset="text", data_files=[str(path)], packing=True)


@pytest.mark.integration
def test_chat_messages_are_rendered_with_the_template_and_only_the_reply_is_scored(tmp_path):
    from graftlm import load_model

    _, tokenizer = load_model("smollm2-135m")
    path = tmp_path / "chat.jsonl"
    chats = [[{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
             for i in range(6)]
    path.write_text("\n".join(json.dumps({"messages": c}) for c in chats))
    train, _ = load_training_data(_data(dataset=str(path), messages_field="messages", n_eval=0), tokenizer)
    first = next(t for t in train if "What is 0 + 1?" in t.prompt)
    full = tokenizer.apply_chat_template(chats[0], tokenize=False)
    assert first.prompt + first.completion == full and not first.add_special_tokens
    assert first.completion.startswith("1<|im_end|>")
    row = tokenize_texts([first], tokenizer, 512)[0]
    scored = [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored).startswith("1<|im_end|>")
    assert row["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(RecipeError, match="the last message must be the assistant's"):
        load_training_data(_data(dataset=str(path), messages_field="messages", n_eval=0), tokenizer)


def test_text_builder_takes_load_kwargs_whole_files(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(f"document {i}\nsecond line of {i}\n")
        paths.append(str(path))
    train, held_out = load_training_data(_data(dataset="text", data_files=paths, text_field="text", n_eval=1,
                                               load_kwargs={"sample_by": "document"}))
    assert len(train) + len(held_out) == 3 and all("\nsecond line of" in t.completion for t in train)
    with pytest.raises(RecipeError, match="data.load_kwargs: set, but the data is a task"):
        _data(task="mqar", load_kwargs={"sample_by": "document"})


def test_a_task_mixed_into_packed_text_gives_blocks_then_rows(tmp_path):
    from graftlm.recipes.loop import tokenize_data

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line number {i} of a small corpus" for i in range(40)))
    raw = {**MINIMAL, "data": {"dataset": "text", "data_files": [str(path)], "text_field": "text", "packing": True,
                               "max_length": 256, "n_eval": 4,
                               "mix": [{"task": "mqar", "task_kwargs": {"num_pairs": 2, "num_queries": 1},
                                        "n_train": 5, "n_eval": 2}]}}
    recipe = build_recipe(raw)
    train, held_out = load_training_data(recipe.data)
    assert (len(train), len(held_out)) == (36 + 5, 4 + 2)
    assert sum(t.pack for t in train) == 36 and all(t.prompt for t in train if not t.pack)
    tokenized = tokenize_data(train, CharTokenizer(), recipe)
    blocks = pack_texts([t.completion for t in train if t.pack], CharTokenizer(), 256)
    assert tokenized["input_ids"][: len(blocks)] == blocks["input_ids"]
    rows = tokenize_texts([t for t in train if not t.pack], CharTokenizer(), 256)
    assert tokenized["input_ids"][len(blocks):] == rows["input_ids"] and len(rows) == 5
    for key, value, message in (("max_length", 8, "data.mix.0.max_length: the mixed sources share"),
                                ("packing", True, "data.mix.0.packing: applies to plain text only"),
                                ("bogus", 1, "data.mix.0.bogus: unknown key")):
        bad = {**raw, "data": {**raw["data"], "mix": [{**raw["data"]["mix"][0], key: value}]}}
        with pytest.raises(RecipeError, match=message):
            build_recipe(bad)
