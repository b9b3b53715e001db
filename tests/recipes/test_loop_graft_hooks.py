"""The loop's optional graft hooks: per-graft optimizer groups (`Graft.parameter_groups`) and logged
statistics (`Graft.training_statistics`), on SST (its blend trains at its own rate beside its LoRA)."""

from dataclasses import dataclass

import pytest
import torch
from graft_fixtures import FFNBiasConfig, FFNBiasGraft, build_tiny_model
from recipe_toys import CharTokenizer, toy_examples, toy_recipe

from graftlm.adapters import register_graft
from graftlm.recipes.loop import parameter_groups, train
from graftlm.recipes.run_log import read_log


def test_sst_blend_trains_at_its_own_rate_and_its_layer_statistics_are_logged(tmp_path):
    recipe = toy_recipe(tmp_path, graft={"type": "sst", "lora_r": 2, "blend_lr": 0.05}, train__steps=1,
                        train__lr=1e-3, train__log_every=1, train__max_grad_norm=None)
    result = train(recipe, build_tiny_model("llama"), CharTokenizer(), toy_examples(8))
    graft = result.model.grafts["default"]
    # AdamW's first step moves every coordinate with a gradient by about its group's rate (eps aside)
    torch.testing.assert_close(graft.gate_unfolded.abs(), torch.full_like(graft.gate_unfolded, 0.05), rtol=1e-2, atol=0)
    lora_b = [p for name, p in result.model.base_model.named_parameters() if "lora_B" in name]
    assert lora_b and max(float(p.detach().abs().max()) for p in lora_b) == pytest.approx(1e-3, rel=1e-3)
    (line,) = read_log(recipe.log_path)
    assert line["lr"] == 1e-3  # the first group: the LoRA's, at the recipe's rate
    layers = result.model.config.num_hidden_layers
    assert {f"sst_{k}/L{i}" for k in ("gate", "blend", "grad") for i in range(layers)} <= set(line)
    assert all(line[f"sst_gate/L{i}"] == 0.0 for i in range(layers))  # logged after the forward, before the step


def test_default_groups_hold_every_trainable_parameter_at_the_recipe_rate():
    from graftlm.adapters import LoRAConfig, attach_adapter

    model = attach_adapter(build_tiny_model("llama"), LoRAConfig(r=2))
    groups = parameter_groups(model, 3e-4)
    assert [g["lr"] for g in groups] == [3e-4]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.graft_parameters()}


@dataclass
class LossTermConfig(FFNBiasConfig):
    """Test graft whose training_loss adds a logged term (asked first in a stack)."""

    graft_type = "test_loop_hooks_loss_term"


class LossTermGraft(FFNBiasGraft):
    def training_loss(self, model, batch):
        loss = model(**batch).loss
        return {"loss": loss, "lm_loss": loss.detach()}


register_graft(LossTermConfig, LossTermGraft)


def test_statistics_of_a_later_graft_join_another_grafts_loss_terms(tmp_path):
    recipe = toy_recipe(tmp_path, graft=[{"type": "test_loop_hooks_loss_term"}, {"type": "sst", "target_layers": [0]}],
                        train__steps=2, train__log_every=1)
    train(recipe, build_tiny_model("llama"), CharTokenizer(), toy_examples(8))
    log = read_log(recipe.log_path)
    assert all({"lm_loss", "sst_gate/L0", "sst_blend/L0", "sst_grad/L0"} <= set(line) for line in log)
    assert log[0]["sst_grad/L0"] == 0.0 and log[1]["sst_grad/L0"] > 0  # the first backward's gradient
