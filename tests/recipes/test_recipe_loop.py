"""The training loop on tiny random models: what changes, what is equal, what stops before training."""

from dataclasses import dataclass

import pytest
import torch
from graft_fixtures import FFNBiasConfig, FFNBiasGraft, build_tiny_model
from recipe_toys import CharTokenizer, toy_examples, toy_recipe

from graftlm.adapters import attach_adapter, register_graft, trainable_state_dict
from graftlm.recipes.checkpoint import checkpoint_dir, latest_checkpoint
from graftlm.recipes.config import RecipeError
from graftlm.recipes.loop import train
from graftlm.recipes.run_log import read_log


def _run(recipe, examples, family="llama", eval_examples=None):
    model = build_tiny_model(family).to(torch.get_default_dtype())
    return train(recipe, model, CharTokenizer(), examples, eval_examples)


def _weights(result):
    return {k: v.clone() for k, v in trainable_state_dict(result.model).items()}


def test_only_graft_parameters_change(tmp_path):
    recipe = toy_recipe(tmp_path, graft=[{"type": "test_ffn_bias"}, {"type": "lora", "r": 2}],
                        train__steps=3)
    model = build_tiny_model("gemma3")
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(recipe, model, CharTokenizer(), toy_examples(8))
    base_after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    trained = _weights(result)
    assert {k.split(".")[0] for k in trained} == {"default", "lora"}  # later grafts are named after their type
    assert trained["default.bias.0"].abs().sum() > 0
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())
    assert result.summary["trainable_params"] == sum(v.numel() for v in trained.values())
    card = (result.output_dir / "adapter" / "README.md").read_text()  # the model card shows the run's figures
    assert "| steps | 3 |" in card and f"| trainable_params | {result.summary['trainable_params']} |" in card


def test_loss_goes_down_on_a_learnable_set(tmp_path):
    # A bias inside the layers can't beat the final norm of a tiny random model; LoRA on the head can.
    recipe = toy_recipe(tmp_path, graft={"type": "lora", "r": 4, "target_modules": ["lm_head"]},
                        train__steps=10, train__lr=0.02)
    result = _run(recipe, toy_examples(16))
    losses = [line["loss"] for line in read_log(recipe.log_path)]
    assert losses[-1] < 0.5 * losses[0]
    assert result.summary["final_loss"] == pytest.approx(losses[-1])


def test_accumulating_k_micro_batches_equals_one_big_batch(tmp_path):
    examples = toy_examples(16, ragged=True)  # micro-batches hold different numbers of answer tokens
    common = {"graft": {"type": "lora", "r": 2}, "train__steps": 3, "train__schedule": "cosine",
              "train__warmup_steps": 1, "train__lr": 0.5, "train__optimizer": "sgd"}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # peft creates the LoRA matrices in the default dtype
    try:
        accumulated = _run(toy_recipe(tmp_path / "a", train__batch_size=2, train__grad_accum=2, **common), examples)
        one_batch = _run(toy_recipe(tmp_path / "b", train__batch_size=4, **common), examples)
    finally:
        torch.set_default_dtype(previous)
    a, b = _weights(accumulated), _weights(one_batch)
    assert all(v.dtype == torch.float64 for v in a.values())
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:  # transformers computes the LM loss in float32, hence not 1e-12
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-9)


def test_resuming_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    examples = toy_examples(12, ragged=True)
    sections = {"graft": {"type": "lora", "r": 2, "dropout": 0.2}, "train__steps": 6, "train__checkpoint_every": 3,
                "train__warmup_steps": 2, "train__schedule": "cosine", "train__batch_size": 3}
    uninterrupted = _run(toy_recipe(tmp_path, **sections), examples)
    checkpoint = checkpoint_dir(tmp_path / "run", 3)
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    resumed_recipe = toy_recipe(tmp_path / "again", **sections, train__resume_from=str(checkpoint))
    resumed = _run(resumed_recipe, examples)
    assert resumed.summary["start_step"] == 3
    expected, got = _weights(uninterrupted), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [line["step"] for line in read_log(resumed_recipe.log_path)] == [4, 5, 6]
    assert latest_checkpoint(tmp_path / "run") == checkpoint_dir(tmp_path / "run", 6)
    (checkpoint_dir(tmp_path / "run", 6) / "checkpoint.json").unlink()  # an interrupted save is not "latest"
    assert latest_checkpoint(tmp_path / "run") == checkpoint


@dataclass
class PullConfig(FFNBiasConfig):
    """Test graft whose hook replaces the LM loss by a pull of every bias towards 1."""

    graft_type = "test_recipes_pull_to_one"


class PullGraft(FFNBiasGraft):
    calls = 0

    def training_loss(self, model, batch):
        PullGraft.calls += 1
        pull = sum(((b - 1.0) ** 2).sum() for b in self.bias.values())
        return {"loss": pull, "pull": pull.detach(), "lm_loss": model(**batch).loss.detach()}


register_graft(PullConfig, PullGraft)


def test_a_grafts_training_loss_hook_supplies_the_loss(tmp_path):
    PullGraft.calls = 0
    recipe = toy_recipe(tmp_path, graft={"type": "test_recipes_pull_to_one"}, train__optimizer="sgd",
                        train__lr=0.2, train__steps=5, train__grad_accum=2, train__batch_size=2,
                        train__max_grad_norm=None)
    result = _run(recipe, toy_examples(8))
    assert PullGraft.calls == 10
    bias = result.model.grafts["default"].bias["0"]
    torch.testing.assert_close(bias, torch.full_like(bias, 1 - 0.6**5))  # SGD on (b-1)^2: b <- b - 0.4 (b-1)
    log = read_log(recipe.log_path)
    assert {"pull", "lm_loss"} <= set(log[-1]) and log[-1]["pull"] < log[0]["pull"]


def test_log_summary_and_adapter_are_written(tmp_path):
    recipe = toy_recipe(tmp_path, train__steps=4, train__eval_every=2, train__log_every=1)
    result = _run(recipe, toy_examples(8), eval_examples=toy_examples(4, answer="no"))
    log = read_log(recipe.log_path)
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "tokens"} <= set(line) for line in log)
    assert [("eval_loss" in line) for line in log] == [False, True, False, True]
    summary = result.summary
    assert summary["final_eval_loss"] == pytest.approx(log[-1]["eval_loss"]) and summary["tokens_per_s"] > 0
    assert (tmp_path / "run" / "train_summary.json").exists() and (tmp_path / "run" / "recipe.yaml").exists()
    reloaded = attach_adapter(build_tiny_model("llama"), tmp_path / "run" / "adapter")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    sections = {"graft": {"type": "lora", "r": 2}, "train__steps": 2}
    plain = _run(toy_recipe(tmp_path / "a", **sections), toy_examples(8))
    checkpointed = _run(toy_recipe(tmp_path / "b", **sections, train__gradient_checkpointing=True), toy_examples(8))
    a, b = _weights(plain), _weights(checkpointed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "sections, examples, message",
    [
        ({"graft": {"type": "test_ffn_bias", "target_layers": [7]}}, 8,
         r"graft 'default' \(type 'test_ffn_bias'\) does not fit model 'tiny-llama'.*target_layers \[7\] outside"),
        ({"graft": {"type": "lora", "target_modules": ["nope_proj"]}}, 8, r"graft 'default' \(type 'lora'\).*nope_proj"),
        ({}, 0, "the training set is empty"),
        ({"train__batch_size": 16}, 8, "fewer than one global batch"),
        ({"train__resume_from": "/nonexistent/step-3"}, 8, "train.resume_from: no checkpoint directory"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, sections, examples, message):
    recipe = toy_recipe(tmp_path, **sections)
    with pytest.raises(RecipeError, match=message):
        _run(recipe, toy_examples(examples))
    assert not (tmp_path / "run").exists()


def test_the_attractor_solve_figures_are_logged_every_step(tmp_path):
    graft = {"type": "attractor", "attn_heads": 2, "attn_head_dim": 8, "mlp_hidden": 16, "max_iter": 12}
    recipe = toy_recipe(tmp_path, graft=graft, train__steps=3, train__log_every=1, train__lr=1e-2)
    _run(recipe, toy_examples(8))
    log = read_log(recipe.log_path)
    figures = {"solve_converged", "solve_fallback", "solve_hit_max_iter", "solve_iterations_mean",
               "solve_iterations_max", "solve_first_guess_residual", "solve_residual_max", "jacobian_loss"}
    assert [line["step"] for line in log] == [1, 2, 3] and all(figures <= set(line) for line in log)
    assert log[0]["solve_first_guess_residual"] == 0.0  # fresh head: g(c) = c
    assert log[-1]["solve_first_guess_residual"] > 0 and log[-1]["solve_iterations_mean"] >= 6  # it opened
    assert all(0.0 <= line["solve_converged"] <= 1.0 for line in log)
