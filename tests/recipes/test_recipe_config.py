"""Recipe files, overrides, data preparation, batch order and LoRA budgets (no training here)."""

import json

import pytest
from graft_fixtures import build_tiny_model
from recipe_toys import CharTokenizer, toy_examples

import graftlm.eval.tasks
from graftlm.adapters import LoRAConfig, attach_adapter, registered_graft_types
from graftlm.recipes.batches import BatchPlan
from graftlm.recipes.budget import lora_rank_for_budget
from graftlm.recipes.cli import main as train_main
from graftlm.recipes.config import (
    RecipeError,
    build_recipe,
    import_graft_modules,
    load_recipe,
    parse_override_args,
    shipped_recipes,
)
from graftlm.recipes.data import IGNORE_INDEX, PaddingCollator, tokenize_examples
from graftlm.recipes.sources import load_training_data

MINIMAL = {"model": {"name": "tiny"}, "graft": {"type": "lora"}, "data": {"dataset": "d.jsonl"}}


def _error(raw) -> str:
    with pytest.raises(RecipeError) as info:
        build_recipe(raw)
    return str(info.value)


@pytest.mark.parametrize("name", ["lora-smollm2-135m", "lora-gemma-3-270m", "sst-smollm2-135m", "sst-gemma-3-270m"])
def test_shipped_recipes_load(name):
    import_graft_modules()
    if name.startswith("sst") and "sst" not in registered_graft_types():
        pytest.skip("the sst graft is not registered yet")
    assert name in shipped_recipes()
    recipe = load_recipe(name)
    assert recipe.model.name in ("smollm2-135m", "gemma-3-270m")
    assert recipe.grafts[0].type == name.split("-")[0]
    assert recipe.train.steps and recipe.data.task


def test_unknown_keys_are_named_with_a_suggestion():
    message = _error({**MINIMAL, "trian": {}, "train": {"stpes": 3}, "graft": {"type": "lora", "rank": 4}})
    assert "trian: unknown key" in message
    assert "train.stpes: unknown key (did you mean train.steps?)" in message
    assert "graft.rank: unknown key" in message


def test_wrong_types_and_ranges_are_named():
    message = _error({**MINIMAL, "train": {"steps": "many", "batch_size": 2.5, "lr": -1.0, "schedule": "cosinus"},
                      "graft": {"type": "lora", "r": "big"}})
    assert "train.steps: must be int | None, got 'many'" in message
    assert "train.batch_size: must be an integer, got 2.5" in message
    assert "train.schedule: must be one of cosine, linear" in message
    assert "graft.r: must be an integer, got 'big'" in message
    assert "train.lr: must be a positive number" in _error({**MINIMAL, "train": {"lr": -1.0}})


def test_unknown_graft_type_and_data_source():
    assert "graft.type: unknown graft type 'nope'; registered:" in _error({**MINIMAL, "graft": {"type": "nope"}})
    message = _error({**MINIMAL, "data": {"dataset": "a.jsonl", "task": "mqar"}})
    assert "give exactly one of `task`" in message


def test_yaml_strings_coerce_to_field_types():
    recipe = build_recipe({**MINIMAL, "train": {"lr": "1e-3", "steps": "5", "gradient_checkpointing": "yes"}})
    assert recipe.train.lr == 1e-3 and recipe.train.steps == 5 and recipe.train.gradient_checkpointing is True


def test_a_yaml_string_for_a_list_of_names_is_one_name():
    recipe = build_recipe({**MINIMAL, "graft": {"type": "lora", "target_modules": "q_proj"}})
    assert recipe.grafts[0].config.target_modules == ["q_proj"]
    assert "graft.target_modules: must be" in _error({**MINIMAL, "graft": {"type": "lora", "target_modules": 3}})


def test_overrides_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({**MINIMAL, "graft": [{"type": "lora"}, {"type": "test_ffn_bias"}]}))
    recipe = load_recipe(path, ["--train.steps", "50", "--train.lr", "1e-3", "--graft.0.r=4",
                                "--graft.0.target_modules", "q_proj,v_proj", "--train.gradient_checkpointing",
                                "--graft.1.scale", "2", "--train.max_grad_norm", "null"])
    assert recipe.train.steps == 50 and isinstance(recipe.train.steps, int)
    assert recipe.train.lr == 1e-3 and recipe.train.gradient_checkpointing is True
    assert recipe.train.max_grad_norm is None
    assert recipe.grafts[0].config.r == 4 and recipe.grafts[0].config.target_modules == ["q_proj", "v_proj"]
    assert recipe.grafts[1].config.scale == 2.0 and recipe.grafts[1].adapter_name == "test_ffn_bias"
    with pytest.raises(RecipeError, match="train.step: unknown key"):
        load_recipe(path, ["--train.step", "50"])
    with pytest.raises(RecipeError, match=r"train.steps: must be int \| None, got '5o'"):
        load_recipe(path, ["--train.steps", "5o"])
    assert parse_override_args(["--a.b", "-1e-3", "--c"]) == [("a.b", "-1e-3"), ("c", "true")]
    recipe = load_recipe(path, ["--data.dataset", "null", "--data.task", "mqar", "--data.task_kwargs.num_pairs", "7",
                                "--data.task_kwargs.name", "x"])
    assert recipe.data.task_kwargs == {"num_pairs": 7, "name": "x"} and recipe.data.dataset is None


def test_cli_bad_recipe_exits_2_naming_the_problem(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({**MINIMAL, "train": {"bogus": 1}}))
    assert train_main([str(path)]) == 2
    assert "train.bogus: unknown key" in capsys.readouterr().err
    assert train_main([str(path), "--dry-run"]) == 2
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    path.write_text(json.dumps({**MINIMAL, "data": {"dataset": str(data)}}))
    assert train_main([str(path), "--dry-run", "--train.steps", "7"]) == 0
    assert "steps: 7" in capsys.readouterr().out


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n')
    recipe = build_recipe({**MINIMAL, "data": {"dataset": str(path), "n_eval": 0}})
    with pytest.raises(RecipeError, match=r"data.answer_field: .*d.jsonl:3 has no field 'answer'; its fields: prompt"):
        load_training_data(recipe.data)
    path.write_text('{"prompt": "a", "answer": "b"}\n[1]\n')
    with pytest.raises(RecipeError, match=r"d.jsonl:2 is not a JSON object"):
        load_training_data(recipe.data)


def test_jsonl_split_and_empty_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f" a{i}"}) + "\n" for i in range(10)))
    recipe = build_recipe({**MINIMAL, "data": {"dataset": str(path), "n_eval": 3}})
    train, held_out = load_training_data(recipe.data)
    assert len(train) == 7 and len(held_out) == 3
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert {(e.completion, e.eos) for e in train} <= {(f" a{i}", True) for i in range(10)}
    path.write_text("")
    with pytest.raises(RecipeError, match="the training set is empty"):
        load_training_data(recipe.data)


def test_task_is_resolved_through_graftlm_eval(monkeypatch):
    made = {}

    class FakeTask:
        answer_prefix = " "
        stop_at_newline = True

        def examples(self, n, seed):
            return toy_examples(n)

    def fake_task(k=0):
        made.update(k=k)
        return FakeTask()

    monkeypatch.setitem(graftlm.eval.tasks._REGISTRY, "toy", fake_task)
    recipe = build_recipe({**MINIMAL, "data": {"task": "toy", "task_kwargs": {"k": 2}, "n_train": 5, "n_eval": 2}})
    train, held_out = load_training_data(recipe.data)
    assert (len(train), len(held_out), made) == (5, 2, {"k": 2})
    assert train[0].prompt == toy_examples(1)[0].prompt and train[0].completion == " ok\n" and not train[0].eos
    recipe = build_recipe({**MINIMAL, "data": {"task": "nope"}})
    with pytest.raises(RecipeError, match="data.task: cannot make task 'nope'.*unknown task 'nope'"):
        load_training_data(recipe.data)


def test_tokenized_labels_cover_only_the_answer():
    dataset = tokenize_examples(toy_examples(3), CharTokenizer(), max_length=32)
    row = dataset[0]
    prompt_len = 1 + len(toy_examples(1)[0].prompt)
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:] and row["labels"][-1] == CharTokenizer.eos_token_id
    batch = PaddingCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.warns(UserWarning, match="1 of 2 examples .* were dropped"):
        tokenize_examples([toy_examples(1)[0], type(toy_examples(1)[0])("x" * 40, "y")], CharTokenizer(), 32)
    with pytest.raises(RecipeError, match="no example of the training set fits max_length=4"):
        tokenize_examples(toy_examples(2), CharTokenizer(), max_length=4)
    with pytest.raises(RecipeError, match="the training set is empty"):
        tokenize_examples([], CharTokenizer(), max_length=32)


def test_batch_plan_shards_disjointly_and_is_addressable():
    plans = [BatchPlan(10, 2, num_processes=2, rank=r, seed=3) for r in range(2)]
    epoch = [i for step in range(plans[0].batches_per_epoch) for p in plans for i in p.indices(step)]
    assert len(epoch) == 8 and len(set(epoch)) == 8
    stream = plans[1].iterate()
    first = [next(stream) for _ in range(7)]
    assert first[5:] == [plans[1].indices(5), plans[1].indices(6)]
    assert plans[0].indices(0) != plans[0].indices(2)  # a new permutation each epoch
    with pytest.raises(RecipeError, match="fewer than one global batch"):
        BatchPlan(3, 2, num_processes=2)


def test_lora_rank_for_budget_is_closest():
    model = build_tiny_model("llama")
    target = 5000
    r = lora_rank_for_budget(model, target, ["q_proj", "v_proj"])

    def count(rank):
        graft_model = attach_adapter(build_tiny_model("llama"), LoRAConfig(r=rank, target_modules=["q_proj", "v_proj"]))
        return graft_model.get_nb_trainable_parameters()[0]

    assert abs(count(r) - target) <= min(abs(count(r - 1) - target), abs(count(r + 1) - target))
    assert lora_rank_for_budget(model, 1) == 1
    with pytest.raises(ValueError, match="no Linear module"):
        lora_rank_for_budget(model, 100, ["nope"])


def test_shipped_echo_recipe_and_its_compare_spec_load():
    """The issue-15 recipe (Echo replacing all but a few layers, text + MQAR mix) and its compare spec validate."""
    from pathlib import Path

    from graftlm.compare.spec import load_compare_spec

    import_graft_modules()
    recipe = load_recipe("echo-replace-smollm2-135m")
    config = recipe.grafts[0].config
    assert (config.mode, config.power, config.distill_weight > 0) == ("replace", 0, True)
    assert 26 <= len(config.target_layers) <= 28 and recipe.data.packing and recipe.data.mix[0]["task"] == "mqar"
    spec = load_compare_spec(Path(__file__).parents[2] / "benchmarks" / "compare" / "echo_replace_most.yaml")
    systems = {s.name: s for s in spec.systems}
    assert systems["window only + LoRA"].budget_of == "Echo K=0"
    assert {systems[f"Echo K={k}"].grafts[0]["power"] for k in range(3)} == {0, 1, 2}
    assert all(s.grafts[0]["target_layers"] == config.target_layers for s in spec.systems if s.grafts)
