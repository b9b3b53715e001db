"""Stacked adapters round-trip: a stack saved under any names reloads from its folder in one call, in the
order it was attached (``graftlm_stack.json``), on tiny Llama and Gemma 3 models."""

import json

import pytest
import torch
from graft_fixtures import AttnBiasConfig, FFNBiasConfig, FFNScaleConfig, build_tiny_model

from graftlm.adapters import (
    AdapterConfigError,
    AttractorConfig,
    EchoConfig,
    LoRAConfig,
    RangeSearchConfig,
    SSTConfig,
    attach_adapter,
)
from graftlm.adapters.io import STACK_NAME

FAMILIES = ["llama", "gemma3"]
IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturb(model, scale=0.3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def stack(family, specs):
    """A model with ``specs`` ((name, config) pairs) attached in that order, its graft tensors perturbed."""
    model = build_tiny_model(family)
    for name, config in specs:
        model = attach_adapter(model, config, adapter_name=name)
    return perturb(model)


# Two grafts on the same FFN output that don't commute: (x + b)(1 + s) != x(1 + s) + b.
ORDERS = {
    "no default, attach order not alphabetical": [("z_bias", FFNBiasConfig()), ("a_scale", FFNScaleConfig())],
    "default attached second": [("first", FFNScaleConfig()), ("default", FFNBiasConfig())],
    "default first, then others": [("default", FFNBiasConfig()), ("scale", FFNScaleConfig()),
                                   ("attn", AttnBiasConfig())],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(ORDERS))
def test_a_stack_reloads_in_its_attach_order_whatever_the_names(family, case, tmp_path):
    specs = ORDERS[case]
    model = stack(family, specs)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / STACK_NAME).read_text())
    assert [entry["name"] for entry in record["adapters"]] == [name for name, _ in specs]
    reloaded = attach_adapter(build_tiny_model(family), tmp_path)
    assert list(reloaded.grafts) == [name for name, _ in specs]
    assert torch.equal(logits(reloaded), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_order_matters_so_the_test_above_can_fail(family, tmp_path):
    """The same two grafts attached the other way round give other logits."""
    specs = ORDERS["no default, attach order not alphabetical"]
    model = stack(family, specs)
    swapped = build_tiny_model(family)
    for name, config in reversed(specs):
        swapped = attach_adapter(swapped, config, adapter_name=name)
    for name in model.grafts:
        swapped.grafts[name].load_state_dict(model.grafts[name].state_dict())
    assert not torch.allclose(logits(swapped), logits(model))


def test_the_names_to_save_keep_the_attach_order(tmp_path):
    model = stack("llama", ORDERS["default first, then others"])
    model.save_pretrained(tmp_path, adapter_names=["attn", "default"])
    assert [e["name"] for e in json.loads((tmp_path / STACK_NAME).read_text())["adapters"]] == ["default", "attn"]
    assert list(attach_adapter(build_tiny_model("llama"), tmp_path).grafts) == ["default", "attn"]


def test_the_root_adapter_loads_under_the_name_asked_for(tmp_path):
    model = stack("gemma3", ORDERS["default attached second"])
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model("gemma3"), tmp_path, adapter_name="bias")
    assert list(reloaded.grafts) == ["first", "bias"] and torch.equal(logits(reloaded), expected)


def test_a_name_for_a_root_adapter_the_stack_does_not_have_is_refused(tmp_path):
    stack("llama", ORDERS["no default, attach order not alphabetical"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cannot load .* as 'mine': it holds no adapter at its root"):
        attach_adapter(build_tiny_model("llama"), tmp_path, adapter_name="mine")
    assert list(attach_adapter(build_tiny_model("llama"), tmp_path).grafts) == ["z_bias", "a_scale"]


def test_a_single_adapter_is_recorded_too(tmp_path):
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig()).save_pretrained(tmp_path)
    record = json.loads((tmp_path / STACK_NAME).read_text())
    assert record["adapters"] == [{"name": "default", "graft_type": "test_ffn_bias"}]
    assert list(attach_adapter(build_tiny_model("llama"), tmp_path).grafts) == ["default"]


def test_adapter_folders_the_record_does_not_list_are_not_part_of_the_save(tmp_path):
    """A Trainer's output folder: the final adapter at the root, checkpoint-N adapters in sub-folders."""
    model = perturb(attach_adapter(build_tiny_model("llama"), FFNBiasConfig()))
    expected = logits(model)
    model.save_pretrained(tmp_path / "checkpoint-2")
    before = (tmp_path / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again neither refuses nor drops the checkpoint
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == before
    model.save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == before
    reloaded = attach_adapter(build_tiny_model("llama"), tmp_path)
    assert list(reloaded.grafts) == ["default"] and torch.equal(logits(reloaded), expected)


def test_a_stack_saved_before_the_record_loads_root_first_then_by_name(tmp_path):
    model = stack("llama", [("default", FFNBiasConfig()), ("b", AttnBiasConfig()), ("a", FFNScaleConfig())])
    model.save_pretrained(tmp_path)
    (tmp_path / STACK_NAME).unlink()  # the layout graftlm wrote before it recorded the order
    assert list(attach_adapter(build_tiny_model("llama"), tmp_path).grafts) == ["default", "a", "b"]


def test_a_save_before_the_record_does_not_take_a_checkpoint_folder_for_a_stacked_adapter(tmp_path):
    model = perturb(attach_adapter(build_tiny_model("llama"), FFNBiasConfig()))
    expected = logits(model)
    model.save_pretrained(tmp_path)
    (tmp_path / STACK_NAME).unlink()  # the old layout, with a Trainer's checkpoint (a save of its own) in it
    model.save_pretrained(tmp_path / "checkpoint-2")
    reloaded = attach_adapter(build_tiny_model("llama"), tmp_path)
    assert list(reloaded.grafts) == ["default"] and torch.equal(logits(reloaded), expected)


def test_a_record_that_disagrees_with_the_folders_is_refused(tmp_path):
    model = stack("llama", ORDERS["no default, attach order not alphabetical"])
    model.save_pretrained(tmp_path)
    good = (tmp_path / STACK_NAME).read_text()
    record = json.loads(good)
    broken = {
        "names a missing adapter": ({"adapters": record["adapters"] + [{"name": "gone", "graft_type": "lora"}]},
                                    r"lists the adapter 'gone', but .*gone/adapter_config.json does not exist"),
        "a name twice": ({"adapters": record["adapters"] * 2}, r"must list each saved adapter once"),
        "an unsafe name": ({"adapters": [{"name": "../z_bias", "graft_type": "test_ffn_bias"}]},
                           r"'../z_bias' is not a valid adapter name"),
        "not a record": ([1, 2], r"graftlm_stack.json is not a readable stack record"),
    }
    for content, message in broken.values():
        (tmp_path / STACK_NAME).write_text(json.dumps(content))
        with pytest.raises(AdapterConfigError, match=message):
            attach_adapter(build_tiny_model("llama"), tmp_path)
    with pytest.raises(FileExistsError, match=r"not a readable stack record.*pass overwrite=True"):
        model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / STACK_NAME).read_text() == good


def test_a_single_adapter_replacing_a_stack_rewrites_the_record(tmp_path):
    stack("llama", ORDERS["default first, then others"]).save_pretrained(tmp_path)
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig()).save_pretrained(tmp_path, overwrite=True)
    assert [e["name"] for e in json.loads((tmp_path / STACK_NAME).read_text())["adapters"]] == ["default"]
    assert not (tmp_path / "attn").exists() and not (tmp_path / "scale").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_real_grafts_stacked_under_their_own_names_round_trip(family, tmp_path):
    """SST, Attractor, Echo, range search and LoRA under non-default names: one save, one load, same logits."""
    specs = [
        ("sst", SSTConfig()),
        ("echo", EchoConfig(rank=4, value_dim=8, chunk_size=4, target_layers=[0, -1])),
        ("range", RangeSearchConfig(mode="exact", budget=0.2, min_keys=0, window=2, n_sink=1, block_size=4)),
        ("head", AttractorConfig(attn_heads=2, attn_head_dim=8, mlp_hidden=32)),
        ("lora", LoRAConfig(r=2)),
    ]
    model = stack(family, specs)
    with torch.no_grad():
        sst = model.grafts["sst"]
        sst.set_blend(sst.config.blend_init, gate=0.5)
    expected = logits(model)
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(name for name, _ in specs)
    reloaded = attach_adapter(build_tiny_model(family), tmp_path)
    assert list(reloaded.grafts) == [name for name, _ in specs]
    assert torch.equal(logits(reloaded), expected)


def test_a_stack_of_two_grafts_with_their_own_losses_is_refused_at_training():
    """Each graft's training_loss runs its own forward; a stack could use only one, so the other's terms
    (Echo's distillation, the Attractor's Jacobian term) would be dropped without a word."""
    from graftlm.adapters import AttractorConfig, EchoConfig
    from graftlm.recipes.objective import graft_training_terms

    model = attach_adapter(build_tiny_model("llama"), EchoConfig(mode="replace", distill_weight=1.0, rank=4,
                                                                 chunk_size=4, window=4))
    model = attach_adapter(model, AttractorConfig(attn_heads=2, attn_head_dim=8, mlp_hidden=16), adapter_name="head")
    batch = {"input_ids": torch.randint(3, 100, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"'default' \(echo\), 'head' \(attractor\) each supply their own"):
        graft_training_terms(model, batch)
    model.grafts["default"].config.distill_weight = 0.0
    assert "jacobian_loss" in graft_training_terms(model, batch)
