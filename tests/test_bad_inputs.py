"""Bad input gets a clear error naming the file and the field, before anything is installed; never a silent
wrong answer. Configs, saved adapters, adapter names, attaching twice, beam search (tiny Llama / Gemma 3)."""

import json
import warnings

import numpy as np
import pytest
import torch
from graft_fixtures import AttnBiasConfig, FFNBiasConfig, build_tiny_model
from safetensors.torch import load_file, save_file

from graftlm.adapters import (
    AdapterBaseMismatchError,
    AdapterConfigError,
    AdapterDtypeWarning,
    AdapterTensorsError,
    AttractorConfig,
    BaseAlreadyGraftedError,
    EchoConfig,
    GraftConfigError,
    LoRAConfig,
    RangeSearchConfig,
    SSTConfig,
    UnsupportedGenerationError,
    attach_adapter,
)
from graftlm.adapters.io import CONFIG_NAME, STACK_NAME, WEIGHTS_NAME

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def all_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def grad_pattern(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def untouched_base(family):
    """A tiny base with a user's own mix of frozen and trainable parameters, and what a refusal must keep."""
    base = build_tiny_model(family)
    base.model.embed_tokens.weight.requires_grad_(False)
    return base, grad_pattern(base), all_hooks(base), logits(base)


def assert_untouched(base, pattern, hooks, before):
    assert grad_pattern(base) == pattern
    assert all_hooks(base) == hooks
    assert torch.equal(logits(base), before)
    assert not any("lora" in name for name, _ in base.named_modules())
    assert "peft_config" not in base.__dict__


# -- configs: every field checked at construction --------------------------------------------------
BAD_CONFIGS = [
    (lambda: SSTConfig(state_source="bogus"),
     "SSTConfig.state_source: must be one of 'ffn_output', 'residual', got 'bogus'"),
    (lambda: SSTConfig(lora_r=-2), "SSTConfig.lora_r: must be an integer >= 0, got -2"),
    (lambda: SSTConfig(blend_min=0.2, blend_max=0.1), "SSTConfig.blend_max: must be above blend_min=0.2, got 0.1"),
    (lambda: SSTConfig(blend_init=0.5), ("SSTConfig.blend_init: must lie strictly between blend_min=0.015 and "
                                         "blend_max=0.1, got 0.5")),
    (lambda: SSTConfig(train_mode="exactly"), "SSTConfig.train_mode: must be one of 'two_pass', 'exact'"),
    (lambda: AttractorConfig(tol=-1, mlp_hidden=0, attn_heads=0, norm_eps=-1),
     ("AttractorConfig.attn_heads: must be an integer >= 1, got 0; AttractorConfig.mlp_hidden: must be an integer "
      ">= 1, got 0; AttractorConfig.norm_eps: must be a finite number > 0.0, got -1.0; AttractorConfig.tol: must "
      "be a finite number >= 0.0, got -1.0")),
    (lambda: AttractorConfig(min_iter=40), "AttractorConfig.min_iter: must be <= max_iter=32, got 40"),
    (lambda: AttractorConfig(gamma_init=2.0), "AttractorConfig.gamma_init: must lie in (0, gamma_max=1.0), got 2.0"),
    (lambda: EchoConfig(num_heads=0, eps=-1),
     "EchoConfig.num_heads: must be an integer >= 1 or None, got 0; EchoConfig.eps: must be a finite number > 0.0"),
    (lambda: EchoConfig(chunk_size=0), "EchoConfig.chunk_size: must be an integer >= 1, got 0"),
    (lambda: EchoConfig(stats_dtype="float16"), "EchoConfig.stats_dtype: must be one of 'float64', 'float32'"),
    (lambda: RangeSearchConfig(window=-5, n_sink=-3),
     ("RangeSearchConfig.n_sink: must be an integer >= 0, got -3; RangeSearchConfig.window: must be an integer "
      ">= 0, got -5")),
    (lambda: RangeSearchConfig(reservoir_size=0), "RangeSearchConfig.reservoir_size: must be an integer >= 1, got 0"),
    (lambda: RangeSearchConfig(n_subspaces=0, leaf_size=0, fanout=1, block_size=0),
     ("RangeSearchConfig.n_subspaces: must be an integer >= 1, got 0; RangeSearchConfig.leaf_size: must be an "
      "integer >= 1, got 0; RangeSearchConfig.fanout: must be an integer >= 2, got 1; RangeSearchConfig.block_size")),
    (lambda: RangeSearchConfig(budget=float("nan")), "RangeSearchConfig.budget: must be a finite number > 0.0, got nan"),
    (lambda: LoRAConfig(r=0), "LoRAConfig.r: must be an integer >= 1, got 0"),
    (lambda: LoRAConfig(r="2"), "LoRAConfig.r: must be an integer >= 1, got '2' (str)"),
    (lambda: LoRAConfig(r=2.0), "LoRAConfig.r: must be an integer >= 1, got 2.0 (float)"),
    (lambda: LoRAConfig(dropout=1.0), "LoRAConfig.dropout: must be a finite number in [0.0, 1.0), got 1.0"),
    (lambda: LoRAConfig(target_modules=[]), "LoRAConfig.target_modules: must be a non-empty list of strings"),
    (lambda: LoRAConfig(target_modules=["q_proj", 3]), "got ['q_proj', 3] (item 1 is 3 (int))"),
    (lambda: FFNBiasConfig(target_layers=[]), ("FFNBiasConfig.target_layers: must be a non-empty list of integers or "
                                               "None, got []")),
    (lambda: FFNBiasConfig(target_layers="0"), "FFNBiasConfig.target_layers: must be a non-empty list of integers"),
    (lambda: FFNBiasConfig(inference_mode="no"), "FFNBiasConfig.inference_mode: must be True or False, got 'no' (str)"),
    (lambda: FFNBiasConfig(scale=float("inf")), "FFNBiasConfig.scale: must be a finite number, got inf"),
]


@pytest.mark.parametrize("make, message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_bad_config_values_are_refused_at_construction(make, message):
    with pytest.raises(GraftConfigError) as info:
        make()
    assert message in str(info.value)


def test_values_are_normalised_not_refused():
    config = SSTConfig(target_layers=np.arange(2).tolist(), lora_r=np.int64(2), blend_init=np.float32(0.05))
    assert config.target_layers == [0, 1] and type(config.lora_r) is int and type(config.blend_init) is float
    assert SSTConfig(target_layers=(0, -1)).target_layers == [0, -1]
    json.dumps(config.to_dict())  # plain Python values only


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_single_target_module_string_is_one_module_not_letters(family):
    config = LoRAConfig(r=2, target_modules="q_proj")
    assert config.target_modules == ["q_proj"]
    model = attach_adapter(build_tiny_model(family), config)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.base_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj"}


def test_model_dependent_config_values_are_refused_before_install():
    base, pattern, hooks, before = untouched_base("llama")
    with pytest.raises(GraftConfigError, match=r"RangeSearchConfig.n_subspaces: must be at most the model's "
                                               r"head_dim=16, got 17"):
        attach_adapter(base, RangeSearchConfig(n_subspaces=17))
    with pytest.raises(GraftConfigError, match=r"FFNBiasConfig.target_layers: target_layers \[5\] outside the "
                                               r"model's 2 layers \(valid: 0..1, or -2..-1 from the end\)"):
        attach_adapter(base, FFNBiasConfig(target_layers=[5]))
    assert_untouched(base, pattern, hooks, before)


def test_a_config_changed_after_construction_is_checked_again_at_attach():
    config = LoRAConfig(r=2)
    config.r = -1
    base, pattern, hooks, before = untouched_base("gemma3")
    with pytest.raises(GraftConfigError, match="LoRAConfig.r: must be an integer >= 1, got -1"):
        attach_adapter(base, config)
    assert_untouched(base, pattern, hooks, before)


# -- saved adapters: every file and field checked before install -----------------------------------
@pytest.fixture
def saved_lora(tmp_path):
    model = attach_adapter(build_tiny_model("llama"), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.graft_parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_record(folder, edit):
    record = json.loads((folder / CONFIG_NAME).read_text())
    edit(record)
    (folder / CONFIG_NAME).write_text(json.dumps(record))


def edit_tensors(folder, edit):
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


BAD_RECORDS = [
    (lambda r: r["config"].update(r="2"), AdapterConfigError,
     r"adapter_config.json: LoRAConfig.r: must be an integer >= 1, got '2' \(str\)"),
    (lambda r: r["config"].update(r=-2, dropout=2.0), AdapterConfigError,
     (r"adapter_config.json: LoRAConfig.r: must be an integer >= 1, got -2; LoRAConfig.dropout: must be a finite "
      r"number in \[0.0, 1.0\), got 2.0")),
    (lambda r: r["config"].update(target_modules=[]), AdapterConfigError,
     r"LoRAConfig.target_modules: must be a non-empty list of strings"),
    (lambda r: r.update(config=None), AdapterConfigError,
     r"adapter_config.json: 'config' must be a JSON object, got None"),
    (lambda r: r.update(base_model="tiny"), AdapterConfigError,
     r"adapter_config.json: 'base_model' must be a JSON object, got 'tiny'"),
    (lambda r: r.pop("graft_type"), AdapterConfigError,
     r"adapter_config.json has no 'graft_type' entry: not a graftlm adapter config"),
]


@pytest.mark.parametrize("edit, error, message", BAD_RECORDS)
def test_bad_saved_configs_are_refused_naming_file_and_field(saved_lora, edit, error, message):
    edit_record(saved_lora, edit)
    base, pattern, hooks, before = untouched_base("llama")
    with pytest.raises(error, match=message) as info:
        attach_adapter(base, saved_lora)
    assert str(saved_lora / CONFIG_NAME) in str(info.value)
    assert_untouched(base, pattern, hooks, before)


def test_invalid_json_and_truncated_safetensors_name_the_file(saved_lora):
    weights = (saved_lora / WEIGHTS_NAME).read_bytes()
    (saved_lora / CONFIG_NAME).write_text('{"graft_type": "lora",')
    base, pattern, hooks, before = untouched_base("llama")
    with pytest.raises(AdapterConfigError, match=r"adapter_config.json is not valid JSON \(Expecting"):
        attach_adapter(base, saved_lora)
    (saved_lora / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(AdapterConfigError, match=r"adapter_config.json must hold a JSON object, not list"):
        attach_adapter(base, saved_lora)
    attach_adapter(build_tiny_model("llama"), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(
        saved_lora, overwrite=True)
    (saved_lora / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(AdapterTensorsError) as info:
        attach_adapter(base, saved_lora)
    assert f"{saved_lora / WEIGHTS_NAME} is not a readable safetensors file" in str(info.value)
    assert_untouched(base, pattern, hooks, before)


def test_integer_bool_and_non_finite_tensors_are_refused(saved_lora):
    name = min(load_file(saved_lora / WEIGHTS_NAME))
    original = (saved_lora / WEIGHTS_NAME).read_bytes()
    base, pattern, hooks, before = untouched_base("llama")
    for dtype in (torch.int64, torch.bool):
        edit_tensors(saved_lora, lambda t, dtype=dtype: t.update({name: t[name].to(dtype)}))
        with pytest.raises(AdapterTensorsError, match=rf"wrong dtypes \['{name}: saved {dtype}, expected "
                                                       rf"torch.float32'\] \(refusing to cast them\)"):
            attach_adapter(base, saved_lora)
        (saved_lora / WEIGHTS_NAME).write_bytes(original)
    edit_tensors(saved_lora, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(AdapterTensorsError, match=rf"{WEIGHTS_NAME}: non-finite values \(NaN or inf\) in \['{name}'\]"):
        attach_adapter(base, saved_lora)
    assert_untouched(base, pattern, hooks, before)


def test_other_float_dtypes_are_cast_exactly_or_with_a_warning(saved_lora):
    name = min(load_file(saved_lora / WEIGHTS_NAME))
    edit_tensors(saved_lora, lambda t: t.update({k: v.half() for k, v in t.items()}))
    exact = load_file(saved_lora / WEIGHTS_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16 -> float32 is exact: no warning
        model = attach_adapter(build_tiny_model("llama"), saved_lora)
    assert torch.equal(model.grafts["default"].adapter_state_dict()[name], exact[name].float())
    edit_tensors(saved_lora, lambda t: t.update({k: v.double() + 1e-12 for k, v in t.items()}))
    with pytest.warns(AdapterDtypeWarning, match=rf"casting \['{name}: torch.float64 -> torch.float32'.*loses precision"):
        attach_adapter(build_tiny_model("llama"), saved_lora)


# -- adapter names -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a.b", "../x", "", "a/b", " x", "-x", "x" * 65, 3])
def test_unsafe_adapter_names_are_refused_before_install(name, tmp_path):
    base, pattern, hooks, before = untouched_base("gemma3")
    with pytest.raises(ValueError, match=r"adapter_name .* is not a valid adapter name: use 1 to 64 letters"):
        attach_adapter(base, FFNBiasConfig(), adapter_name=name)
    assert_untouched(base, pattern, hooks, before)
    model = attach_adapter(base, FFNBiasConfig())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a valid adapter name"):
        model.load_adapter(tmp_path, adapter_name=name)
    assert list(model.grafts) == ["default"]
    model.detach()
    assert_untouched(base, pattern, hooks, before)


def test_a_saved_sub_folder_with_an_unsafe_name_is_refused(tmp_path):
    model = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    (tmp_path / "b").rename(tmp_path / "a" / "x.y")
    for record in (tmp_path / "a" / STACK_NAME, tmp_path / "a" / "x.y" / STACK_NAME):
        record.unlink()  # the layout before stack records: every sub-folder holding an adapter is loaded
    base, pattern, hooks, before = untouched_base("llama")
    with pytest.raises(ValueError, match=r"sub-adapter folder .*a/x.y: 'x.y' is not a valid adapter name"):
        attach_adapter(base, tmp_path / "a")
    assert_untouched(base, pattern, hooks, before)


# -- one GraftModel per base ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attaching_twice_to_the_same_raw_base_is_refused(family):
    base, pattern, hooks, before = untouched_base(family)
    first = attach_adapter(base, FFNBiasConfig())
    with torch.no_grad():
        next(iter(first.graft_parameters())).fill_(0.5)
    grafted = logits(first)
    with pytest.raises(BaseAlreadyGraftedError, match=r"already wrapped by a GraftModel \(grafts attached: "
                                                      r"'default' \(test_ffn_bias\)\).*Stack on that GraftModel"):
        attach_adapter(base, LoRAConfig(r=2))  # a re-run notebook cell
    assert torch.equal(logits(first), grafted) and list(first.grafts) == ["default"]
    first.detach()
    assert_untouched(base, pattern, hooks, before)
    with pytest.raises(RuntimeError, match="was detached"):
        first.add_graft(FFNBiasConfig())
    again = attach_adapter(base, FFNBiasConfig())  # after detach, a new GraftModel is fine
    assert torch.equal(logits(again), before)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_refused_load_restores_the_base_exactly(family, tmp_path):
    attach_adapter(build_tiny_model("llama", hidden_size=96), FFNBiasConfig()).save_pretrained(tmp_path / "wide")
    stacked = attach_adapter(build_tiny_model(family), FFNBiasConfig())
    attach_adapter(stacked, LoRAConfig(r=2), adapter_name="extra").save_pretrained(tmp_path / "stack")
    edit_tensors(tmp_path / "stack" / "extra", lambda t: t.popitem())  # the second of two adapters is bad
    base, pattern, hooks, before = untouched_base(family)
    other = "a model of the same name but another shape" if family == "llama" else "not on this model"
    with pytest.raises(AdapterBaseMismatchError, match=other):
        attach_adapter(base, tmp_path / "wide")
    assert_untouched(base, pattern, hooks, before)
    with pytest.raises(AdapterTensorsError, match=r"stack/extra/adapter_model.safetensors: missing tensors"):
        attach_adapter(base, tmp_path / "stack")
    assert_untouched(base, pattern, hooks, before)
    model = attach_adapter(base, AttnBiasConfig())  # the base is free again; a refused stacked load on a
    hooks_with_graft = all_hooks(base)               # GraftModel removes only what this load installed
    with pytest.raises(AdapterTensorsError):
        model.load_adapter(tmp_path / "stack", adapter_name="other")
    assert list(model.grafts) == ["default"] and all_hooks(base) == hooks_with_graft
    model.detach()
    assert_untouched(base, pattern, hooks, before)


# -- generation modes a graft can't run -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_and_assisted_generation_are_refused_for_grafts_that_cannot_reorder_or_crop_their_state(family):
    """Every graftlm graft reorders its state with the beams (tests/test_graft_cache.py); a graft that can't
    (``supports_beam_search = False``) or can't crop it (``supports_crop = False``: Echo) is refused by name."""
    from transformers import GenerationConfig

    model = attach_adapter(build_tiny_model(family), FFNBiasConfig())
    model.grafts["default"].supports_beam_search = False
    prompt = IDS[:, :4]
    with pytest.raises(UnsupportedGenerationError, match=r"beam search \(num_beams=3\) is not supported with the "
                                                         r"graft 'default' \(test_ffn_bias\)"):
        model.generate(input_ids=prompt, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    with pytest.raises(UnsupportedGenerationError, match="num_beams=2"):
        model.generate(input_ids=prompt, generation_config=GenerationConfig(num_beams=2, max_new_tokens=3),
                       pad_token_id=0)
    echo = attach_adapter(build_tiny_model(family), EchoConfig(rank=4, chunk_size=4))
    with pytest.raises(UnsupportedGenerationError, match=r"assisted generation \(prompt_lookup_num_tokens\)"):
        echo.generate(input_ids=prompt, max_new_tokens=3, prompt_lookup_num_tokens=2, pad_token_id=0)
    with pytest.raises(UnsupportedGenerationError, match=r"assisted generation \(assistant_model\) is not supported "
                                                         r"with the graft 'default' \(echo\)"):
        echo.generate(input_ids=prompt, max_new_tokens=3, assistant_model=build_tiny_model(family), pad_token_id=0)
    greedy = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert greedy.shape == (1, 7)
    with model.disable_adapter():  # the base alone may beam-search
        model.generate(input_ids=prompt, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with echo.disable_adapter():
        echo.generate(input_ids=prompt, max_new_tokens=3, prompt_lookup_num_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_still_runs_for_grafts_that_reorder_their_state(family):
    """Echo reorders its state with the beams: each returned beam's score is the model's own score of it."""
    model = attach_adapter(build_tiny_model(family), EchoConfig(rank=4, chunk_size=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    prompt = IDS[:, :6]
    out = model.generate(input_ids=prompt, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True, pad_token_id=0,
                         eos_token_id=None)
    for sequence, score in zip(out.sequences, out.sequences_scores):
        log_probs = logits(model, sequence[None]).log_softmax(-1)[0, prompt.shape[1] - 1 : -1]
        own = log_probs.gather(-1, sequence[prompt.shape[1]:, None]).sum()
        torch.testing.assert_close(own, score, atol=1e-4, rtol=0)
