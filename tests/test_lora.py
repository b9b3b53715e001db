"""The peft LoRA graft (the matched-budget baseline) through the same attach/save/load machinery."""

import torch
from graft_fixtures import FFNBiasConfig, build_tiny_model
from test_attach import IDS, all_hooks, logits, perturb

from graftlm import LoRAConfig, attach_adapter


def family_of(model):
    return "llama" if model.config.model_type == "llama" else "gemma3"


def test_lora_fresh_equals_base_and_counts_parameters(tiny_model):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(logits(model), before)
    config = tiny_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_out, v_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = 4 * (config.hidden_size + q_out) + 4 * (config.hidden_size + v_out)
    assert model.get_nb_trainable_parameters()[0] == per_layer * config.num_hidden_layers
    assert all(not p.requires_grad for n, p in tiny_model.named_parameters() if "lora_" not in n)


def test_lora_save_reload_detach_and_disable(tiny_model, tmp_path):
    before = logits(tiny_model)
    hooks = all_hooks(tiny_model)
    model = attach_adapter(tiny_model, LoRAConfig(r=2, target_layers=[0]))
    perturb(model)
    expected = logits(model)
    assert not torch.allclose(expected, before)
    with model.disable_adapter():
        assert torch.equal(logits(model), before)
    assert torch.equal(logits(model), expected)
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model(family_of(tiny_model)), tmp_path)
    assert torch.equal(logits(reloaded), expected)
    base = model.detach()
    assert torch.equal(logits(base), before)
    assert all_hooks(base) == hooks
    assert not any("lora_" in n for n, _ in base.named_parameters())


def test_lora_stacks_with_another_graft_and_trains(tiny_model):
    model = attach_adapter(tiny_model, LoRAConfig(r=2))
    model = attach_adapter(model, FFNBiasConfig(), adapter_name="bias")
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    params = list(model.graft_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    lora_b = [p for n, p in tiny_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)


def test_lora_parameter_names_are_the_same_in_every_attach():
    """Sharded / distributed checkpoints key by parameter name: the peft adapter's name must not depend on
    the process or the object (it once held ``id(graft)``)."""
    names = []
    for _ in range(2):
        model = attach_adapter(build_tiny_model("llama"), LoRAConfig(r=2))
        names.append(sorted(name for name, p in model.base_model.named_parameters() if p.requires_grad))
    assert names[0] == names[1] and names[0]
    assert all(".graftlm_lora." in name for name in names[0])
