"""attach / save / load / detach / stack on tiny random Llama and Gemma 3 models."""

import json
import warnings

import pytest
import torch
from graft_fixtures import AttnBiasConfig, FFNBiasConfig, build_tiny_model, graft_gradients

import graftlm
from graftlm.adapters import (
    AdapterBaseMismatchError,
    AdapterTensorsError,
    GraftConfigWarning,
    GraftModel,
    NewerVersionWarning,
    UnknownGraftTypeError,
    attach_adapter,
)
from graftlm.adapters.io import CARD_NAME, CONFIG_NAME, STACK_NAME, WEIGHTS_NAME
from graftlm.patches import UnsupportedArchitectureError

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14]])  # odd length on purpose


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model: GraftModel, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def all_hooks(module):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


def test_fresh_adapter_reproduces_base_logits_exactly(tiny_model):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, FFNBiasConfig())
    assert isinstance(model, GraftModel)
    assert torch.equal(logits(model), before)


def test_base_is_frozen_and_only_graft_trains(tiny_model):
    model = attach_adapter(tiny_model, FFNBiasConfig())
    assert all(not p.requires_grad for p in model.base_model.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    d, layers = tiny_model.config.hidden_size, tiny_model.config.num_hidden_layers
    assert trainable == d * layers
    assert total == sum(p.numel() for p in tiny_model.parameters()) + d * layers


def test_graft_changes_logits_and_gets_gradients(tiny_model):
    model = attach_adapter(tiny_model, FFNBiasConfig())
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = [p.grad for p in model.graft_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    before = logits(model)
    perturb(model)
    assert not torch.allclose(logits(model), before)


def test_save_and_reload_reproduces_logits_exactly(tiny_model, tmp_path):
    family = "llama" if tiny_model.config.model_type == "llama" else "gemma3"
    model = attach_adapter(tiny_model, FFNBiasConfig(scale=0.5, target_layers=[0, -1]))
    perturb(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, STACK_NAME]
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert record["graft_type"] == "test_ffn_bias"
    assert record["graftlm_version"] == graftlm.__version__
    assert record["config"]["scale"] == 0.5
    assert record["base_model"]["hidden_size"] == tiny_model.config.hidden_size
    assert record["base_model"]["num_hidden_layers"] == tiny_model.config.num_hidden_layers
    assert record["base_model"]["architecture"] == type(tiny_model).__name__

    fresh = build_tiny_model(family)
    reloaded = attach_adapter(fresh, str(tmp_path))
    assert torch.equal(logits(reloaded), expected)
    assert all(not p.requires_grad for p in reloaded.parameters())  # loaded frozen, like peft
    trainable = attach_adapter(build_tiny_model(family), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_safetensors_holds_only_graft_tensors(tiny_model, tmp_path):
    from safetensors.torch import load_file

    model = attach_adapter(tiny_model, FFNBiasConfig())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert set(tensors) == {f"bias.{i}" for i in range(tiny_model.config.num_hidden_layers)}


def test_detach_is_bit_exact_and_removes_every_hook(tiny_model):
    tiny_model.model.embed_tokens.weight.requires_grad_(False)  # a user's own freezing survives detach
    before = logits(tiny_model)
    hooks_before = all_hooks(tiny_model)
    model = attach_adapter(tiny_model, FFNBiasConfig())
    model = attach_adapter(model, AttnBiasConfig(), adapter_name="attn")
    perturb(model)
    assert all_hooks(tiny_model) > hooks_before
    base = model.detach()
    assert base is tiny_model
    assert all_hooks(base) == hooks_before
    assert torch.equal(logits(base), before)
    assert base.model.norm.weight.requires_grad  # requires_grad restored as it was
    assert not base.model.embed_tokens.weight.requires_grad


def test_disable_adapter_gives_base_logits(tiny_model):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, FFNBiasConfig())
    perturb(model)
    grafted = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), before)
    assert torch.equal(logits(model), grafted)


def test_stacking_two_kinds_and_round_trip(tiny_model, tmp_path):
    family = "llama" if tiny_model.config.model_type == "llama" else "gemma3"
    model = attach_adapter(tiny_model, FFNBiasConfig())
    model = attach_adapter(model, AttnBiasConfig(), adapter_name="attn")
    assert set(model.grafts) == {"default", "attn"}
    perturb(model)
    expected = logits(model)
    with pytest.raises(ValueError, match="already attached"):
        attach_adapter(model, FFNBiasConfig(), adapter_name="again")
    with pytest.raises(ValueError, match="already attached"):
        attach_adapter(model, AttnBiasConfig(), adapter_name="attn")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "attn" / CONFIG_NAME).exists()
    reloaded = attach_adapter(build_tiny_model(family), tmp_path)
    assert set(reloaded.grafts) == {"default", "attn"}
    assert torch.equal(logits(reloaded), expected)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    model = attach_adapter(tiny_model, FFNBiasConfig())
    perturb(model)
    model.train()

    plain = graft_gradients(model, IDS)
    model.gradient_checkpointing_enable()
    assert model.base_model.is_activation_checkpointing
    checkpointed = graft_gradients(model, IDS)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generation_with_graft_matches_full_forward(tiny_model):
    model = attach_adapter(tiny_model, FFNBiasConfig())
    perturb(model)
    prompt = IDS[:, :5]
    generated = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    full = logits(model, generated)
    greedy = full[:, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(greedy, generated[:, prompt.shape[1] :])


def test_print_trainable_parameters(tiny_model, capsys):
    model = attach_adapter(tiny_model, FFNBiasConfig())
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,}" in out and f"all params: {total:,}" in out


# -- errors -------------------------------------------------------------------------------------
def test_wrong_base_model_names_both_sides(tmp_path):
    model = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
    model.save_pretrained(tmp_path)
    wider = build_tiny_model("llama", hidden_size=96)
    with pytest.raises(AdapterBaseMismatchError, match=r"hidden_size: adapter has 64, model has 96"):
        attach_adapter(wider, tmp_path)
    with pytest.raises(AdapterBaseMismatchError, match=r"architecture: adapter has 'LlamaForCausalLM'"):
        attach_adapter(build_tiny_model("gemma3"), tmp_path)
    deeper = build_tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(AdapterBaseMismatchError, match="num_hidden_layers"):
        attach_adapter(deeper, tmp_path)
    assert all_hooks(deeper) == 0  # a refused load leaves nothing behind


def _edit_saved(tmp_path, edit_tensors=None, edit_record=None):
    from safetensors.torch import load_file, save_file

    if edit_tensors:
        tensors = load_file(tmp_path / WEIGHTS_NAME)
        edit_tensors(tensors)
        save_file(tensors, tmp_path / WEIGHTS_NAME)
    if edit_record:
        record = json.loads((tmp_path / CONFIG_NAME).read_text())
        edit_record(record)
        (tmp_path / CONFIG_NAME).write_text(json.dumps(record))


def test_missing_and_unexpected_tensors_raise(tmp_path):
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig()).save_pretrained(tmp_path)
    _edit_saved(tmp_path, edit_tensors=lambda t: t.pop("bias.1"))
    fresh = build_tiny_model("llama")
    with pytest.raises(AdapterTensorsError, match=r"missing tensors \['bias.1'\]"):
        attach_adapter(fresh, tmp_path)
    assert all_hooks(fresh) == 0
    _edit_saved(tmp_path, edit_tensors=lambda t: t.update({"bias.1": torch.zeros(64), "extra": torch.zeros(2)}))
    with pytest.raises(AdapterTensorsError, match=r"unexpected tensors \['extra'\]"):
        attach_adapter(build_tiny_model("llama"), tmp_path)
    _edit_saved(tmp_path, edit_tensors=lambda t: (t.pop("extra"), t.update({"bias.0": torch.zeros(3)})))
    with pytest.raises(AdapterTensorsError, match=r"wrong shapes"):
        attach_adapter(build_tiny_model("llama"), tmp_path)


def test_config_from_newer_version_warns_and_ignores_unknown_keys(tmp_path):
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig(scale=2.0)).save_pretrained(tmp_path)

    def newer(record):
        record["graftlm_version"] = "99.0.0"
        record["config"]["future_knob"] = 3

    _edit_saved(tmp_path, edit_record=newer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_adapter(build_tiny_model("llama"), tmp_path)
    kinds = {type(w.message) for w in caught}
    assert NewerVersionWarning in kinds and GraftConfigWarning in kinds
    assert any("future_knob" in str(w.message) for w in caught)
    assert model.grafts["default"].config.scale == 2.0


def test_unknown_graft_type_lists_registered(tmp_path):
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig()).save_pretrained(tmp_path)
    _edit_saved(tmp_path, edit_record=lambda r: r.update({"graft_type": "nope"}))
    with pytest.raises(UnknownGraftTypeError, match=r"unknown graft type 'nope'.*test_ffn_bias"):
        attach_adapter(build_tiny_model("llama"), tmp_path)


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='gpt2'.*supported model types: .*llama"):
        attach_adapter(gpt2, FFNBiasConfig())


def test_saving_never_overwrites_another_graft_silently(tmp_path):
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig()).save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    other = attach_adapter(build_tiny_model("llama"), AttnBiasConfig())
    with pytest.raises(FileExistsError, match="refusing to replace"):
        other.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    other.save_pretrained(tmp_path, overwrite=True)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["graft_type"] == "test_attn_bias"


def test_missing_directory_and_unreachable_hub_give_clear_errors(tmp_path):
    model = build_tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        attach_adapter(model, str(tmp_path / "nowhere" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a graftlm adapter directory"):
        attach_adapter(model, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        attach_adapter(model, "someone/no-such-graftlm-adapter")


def test_target_layers_outside_model_raise():
    with pytest.raises(ValueError, match="outside the model"):
        attach_adapter(build_tiny_model("llama"), FFNBiasConfig(target_layers=[5]))
