"""The Echo graft (issue 6 parts 2-5) on tiny random Llama and Gemma 3 models: exact identity at init,
prefill + decode == full forward, left padding, save/load, checkpointing, window-only KV, distillation."""

import pytest
import torch
from graft_fixtures import build_tiny_model

import graftlm
from graftlm.adapters import attach_adapter
from graftlm.adapters.echo import EchoConfig
from graftlm.adapters.echo_cache import EchoWindowLayer
from graftlm.adapters.graft_cache import GraftCache

FAMILIES = ["llama", "gemma3"]
CHUNK = 5  # prompts below end mid-chunk
IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14, 99, 23, 4, 87, 51, 11, 70, 29, 6, 64, 38, 100]])


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def echo_config(mode="parallel", **overrides):
    values = {"mode": mode, "rank": 4, "value_dim": 8, "chunk_size": CHUNK, "target_layers": [0, -1]}
    values.update(overrides)
    return EchoConfig(**values)


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def perturb(model, seed=1, scale=0.3):
    """Random W_o (the branch starts silent) and nudged projections, gamma kept inside its clamp."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in model.grafts["default"].branches.values():
            for linear in (branch.w_q, branch.w_k, branch.w_v, branch.w_o):
                linear.weight.add_(torch.randn(linear.weight.shape, generator=generator) * scale)
            branch.gamma.fill_(1.25)
            branch.eta.fill_(0.8)


def generate_logits(model, ids, new_tokens, **kwargs):
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out, torch.stack(out.logits, dim=1)


# -- identity at init ----------------------------------------------------------------------------
def test_fresh_parallel_adapter_reproduces_base_exactly(tiny_model):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, echo_config("parallel", target_layers=None))
    assert torch.equal(logits(model), before)


def test_replace_with_ramp_zero_reproduces_base_exactly(tiny_model):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, echo_config("replace", replace_ramp=0.0))
    assert model.config._attn_implementation.startswith("graftlm_echo_")
    assert torch.equal(logits(model), before)


# -- the branch does something and trains ----------------------------------------------------------
@pytest.mark.parametrize("mode,ramp", [("parallel", 1.0), ("replace", 1.0), ("replace", 0.5)])
def test_perturbed_graft_changes_logits_and_every_parameter_gets_gradient(tiny_model, mode, ramp):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, echo_config(mode, replace_ramp=ramp))
    perturb(model)
    assert not torch.allclose(logits(model), before, atol=1e-3)
    model(input_ids=IDS, labels=IDS).loss.backward()
    named = dict(model.grafts["default"].named_parameters())
    assert len(named) == 2 * 6
    for name, parameter in named.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def changed_at(position, ids=IDS):
    changed = ids.clone()
    changed[0, position] = 111
    return changed


@pytest.mark.parametrize("sinks", [0, 2])
def test_replace_mode_sees_only_the_window_the_sinks_and_the_echo_state(sinks):
    """With W_o = 0 every layer replaced is window attention only: a token more than the layers' summed
    windows back cannot reach the logits unless it is one of the first ``sinks`` tokens; with Echo on
    (W_o != 0) it can, through the state."""
    window = 4
    model = attach_adapter(build_tiny_model("llama"),
                           echo_config("replace", window=window, target_layers=None, sink_tokens=sinks))
    reach = 2 * (window - 1)  # two layers
    first = sinks  # the first token that is not a sink
    a, b = logits(model), logits(model, changed_at(first))
    assert torch.equal(a[:, first + reach + 1:], b[:, first + reach + 1:])
    assert not torch.allclose(a[:, first:first + reach + 1], b[:, first:first + reach + 1])
    if sinks:
        sink = logits(model, changed_at(sinks - 1))
        assert torch.equal(a[:, :sinks - 1], sink[:, :sinks - 1])  # causal
        far = slice(first + reach + 1, None)
        assert (a[0, far] - sink[0, far]).abs().amax(-1).min() > 1e-4  # every later position sees the sink
    perturb(model)
    a, b = logits(model), logits(model, changed_at(first))
    assert not torch.allclose(a[:, first + reach + 1:], b[:, first + reach + 1:], atol=1e-5)


def test_blockwise_window_attention_matches_one_block_with_padding():
    model = attach_adapter(build_tiny_model("gemma3"), echo_config("replace", window=6, target_layers=[1, 2]))
    perturb(model)
    ids = torch.randint(3, 128, (2, 301), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    graft = model.grafts["default"]
    graft.query_block = 16  # 19 blocks
    blocks = logits(model, ids, attention_mask=mask)
    graft.query_block = 1000
    one = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(blocks[0, 37:], one[0, 37:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocks[1], one[1], atol=1e-5, rtol=1e-5)


# -- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,ramp", [("parallel", 1.0), ("replace", 1.0), ("replace", 0.5)])
def test_prefill_then_decode_matches_full_forward(family, mode, ramp):
    model = attach_adapter(build_tiny_model(family), echo_config(mode, replace_ramp=ramp))
    perturb(model)
    prompt = IDS[:, :13]  # 13 = 2 chunks of 5 + 3: prefill ends mid-chunk
    out, decoded = generate_logits(model, prompt, 9)
    assert isinstance(out.past_key_values, GraftCache) and out.past_key_values.state("echo") is not None
    full = logits(model, out.sequences)
    torch.testing.assert_close(decoded, full[:, prompt.shape[1] - 1:-1], atol=2e-5, rtol=1e-5)


def test_generation_without_a_cache_matches_generation_with_one():
    model = attach_adapter(build_tiny_model("gemma3"), echo_config("replace", window=3))
    perturb(model)
    cached, with_cache = generate_logits(model, IDS[:, :12], 7)
    uncached, without = generate_logits(model, IDS[:, :12], 7, use_cache=False)
    assert uncached.past_key_values is None
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(with_cache, without, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_used_by_hand_matches_full_forward(family):
    """Prefill then one forward per token with the graft's own cache, outside ``generate``."""
    model = attach_adapter(build_tiny_model(family), echo_config("replace", window=3))
    perturb(model)
    cache = model.grafts["default"].make_cache()
    steps = [logits(model, IDS[:, :7], past_key_values=cache, use_cache=True)]
    for t in range(7, IDS.shape[1]):
        steps.append(logits(model, IDS[:, t:t + 1], past_key_values=cache, use_cache=True))
    torch.testing.assert_close(torch.cat(steps, dim=1), logits(model), atol=2e-5, rtol=1e-5)


def test_continuing_without_an_echo_cache_raises():
    model = attach_adapter(build_tiny_model("llama"), echo_config("parallel"))
    with torch.no_grad():
        past = model(input_ids=IDS[:, :7], use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="EchoCache"):
            model(input_ids=IDS[:, 7:8], past_key_values=past, use_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_left_padded_row_generates_like_the_unpadded_row(family, mode):
    model = attach_adapter(build_tiny_model(family), echo_config(mode, window=4))
    perturb(model)
    short, long = IDS[:, :9], IDS[:, 2:18]
    pad = long.shape[1] - short.shape[1]  # 7: would shift the short row's chunk grid unless handled per row
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    _, alone = generate_logits(model, short, 8)
    _, together = generate_logits(model, batch, 8, attention_mask=mask)
    torch.testing.assert_close(together[:1], alone, atol=2e-5, rtol=1e-5)
    _, long_alone = generate_logits(model, long, 8)
    torch.testing.assert_close(together[1:], long_alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_generation_keeps_no_kv_beyond_the_window(family):
    window = 4
    base = build_tiny_model(family, num_hidden_layers=3)  # the middle layer keeps the base's own cache
    model = attach_adapter(base, echo_config("replace", window=window, target_layers=[0, 2]))
    perturb(model)
    out, _ = generate_logits(model, IDS[:, :11], 20)
    cache = out.past_key_values
    sinks = model.grafts["default"].sinks
    assert sinks[2] == 4 and sinks[0] == (4 if family == "llama" else 0)  # a sliding layer gets no sinks
    for index in (0, 2):
        assert isinstance(cache.layers[index], EchoWindowLayer)
        assert cache.layers[index].keys.shape[-2] == window - 1 + sinks[index]
        assert cache.state("echo").nbytes(index) > 0
    seen = out.sequences.shape[1] - 1
    middle = seen if family == "llama" else base.config.sliding_window - 1  # full / sliding(8) attention
    assert cache.layers[1].keys.shape[-2] == middle
    assert cache.get_seq_length() == seen


# -- persistence and lifecycle ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_save_and_load_reproduce_logits_exactly(tiny_model, tmp_path, mode):
    family = "llama" if tiny_model.config.model_type == "llama" else "gemma3"
    model = attach_adapter(tiny_model, echo_config(mode, replace_ramp=0.5, power=1))
    perturb(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model(family), tmp_path)
    graft = reloaded.grafts["default"]
    saved = {k: v for k, v in model.grafts["default"].config.to_dict().items() if k != "inference_mode"}
    assert {k: v for k, v in graft.config.to_dict().items() if k != "inference_mode"} == saved
    assert all(not p.requires_grad for p in graft.parameters())
    assert torch.equal(logits(reloaded), expected)


@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_detach_restores_the_base_bit_exactly(tiny_model, mode):
    before = logits(tiny_model)
    implementation = tiny_model.config._attn_implementation
    model = attach_adapter(tiny_model, echo_config(mode))
    perturb(model)
    assert not torch.equal(logits(model), before)
    with model.disable_adapter():
        assert torch.equal(logits(model), before)
    base = model.detach()
    assert base.config._attn_implementation == implementation
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()) == 0
    assert torch.equal(logits(base), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """Replace mode, ramp 0.5, distillation on: the recompute must redo the same attention calls."""
    grads = []
    for checkpointing in (False, True):
        model = attach_adapter(build_tiny_model(family),
                               echo_config("replace", replace_ramp=0.5, distill_weight=0.5, target_layers=[1]))
        perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        terms = model.grafts["default"].training_loss(model, {"input_ids": IDS, "labels": IDS})
        terms["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.grafts["default"].named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_loss_is_finite_and_reaches_the_echo_parameters(family):
    model = attach_adapter(build_tiny_model(family), echo_config("replace", distill_weight=1.0))
    graft = model.grafts["default"]
    terms = graft.training_loss(model, {"input_ids": IDS})
    assert set(terms) == {"loss", "lm_loss", "distill_loss"}
    assert torch.isfinite(terms["loss"]) and terms["distill_loss"] > 0
    terms["loss"].backward()
    for branch in graft.branches.values():  # W_o = 0: only W_o is reachable at init
        assert branch.w_o.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    perturb(model)
    distill = graft.training_loss(model, {"input_ids": IDS})["distill_loss"]
    terms = graft.training_loss(model, {"input_ids": IDS})
    (terms["loss"] - terms["lm_loss"]).backward()  # the distillation term alone
    torch.testing.assert_close(terms["distill_loss"], distill)
    for name, parameter in graft.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert graft._distill_terms is None and not graft._pending


def test_ramp_schedule_rises_to_the_configured_ramp_and_only_in_replace_mode():
    model = attach_adapter(build_tiny_model("llama"), echo_config("replace", replace_ramp=0.8, ramp_fraction=0.5))
    graft = model.grafts["default"]
    ramps = []
    for step in range(1, 11):
        graft.on_train_step(step, 10)
        ramps.append(graft.replace_ramp)
    assert ramps[:5] == pytest.approx([0.8 * s / 5 for s in range(1, 6)])
    assert ramps[5:] == [0.8] * 5  # held at the configured value; the last step leaves it there
    with pytest.raises(ValueError, match="ramp_fraction"):
        EchoConfig(mode="parallel", ramp_fraction=0.5)
    with pytest.raises(ValueError, match="ramp_fraction"):
        EchoConfig(mode="replace", ramp_fraction=1.5)
    constant = attach_adapter(build_tiny_model("llama"), echo_config("replace", replace_ramp=0.3))
    constant.grafts["default"].on_train_step(1, 10)
    assert constant.grafts["default"].replace_ramp == 0.3


def test_training_loss_is_plain_lm_loss_without_distillation():
    model = attach_adapter(build_tiny_model("llama"), echo_config("replace"))
    assert model.grafts["default"].training_loss(model, {"input_ids": IDS, "labels": IDS}) is None


def test_long_and_repeated_sequences_stay_finite():
    model = attach_adapter(build_tiny_model("llama", max_position_embeddings=4096),
                           echo_config("parallel", chunk_size=64, rank=8))
    perturb(model)
    long = torch.randint(3, 128, (1, 2049), generator=torch.Generator().manual_seed(0))
    repeated = torch.full((1, 301), 7)
    for ids in (long, repeated):
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.logits).all()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.graft_parameters())
        model.zero_grad(set_to_none=True)


# -- config and registry ----------------------------------------------------------------------------
def test_config_validation_and_registry():
    assert "echo" in graftlm.registered_graft_types()
    assert graftlm.EchoConfig is EchoConfig
    with pytest.raises(ValueError, match="mode"):
        EchoConfig(mode="sideways")
    with pytest.raises(ValueError, match="replace"):
        EchoConfig(mode="parallel", distill_weight=0.1)
    with pytest.raises(ValueError, match="ramp"):
        EchoConfig(mode="replace", replace_ramp=1.5)
    model = attach_adapter(build_tiny_model("gemma3"), EchoConfig(rank=8))
    branch = model.grafts["default"].branches["0"]
    assert (branch.heads, branch.rank, branch.value_dim) == (4, 8, 16)  # defaults: the model's heads, head_dim


def test_a_row_gather_keeps_equal_phases_known_on_the_host():
    """Beam search reorders the rows every step: with every row in the same chunk phase the phases stay
    known (no readout rebuild per token); mixed phases, or a boolean row mask, make them unknown."""
    from graftlm.testing import generation_cache

    model = attach_adapter(build_tiny_model("llama"), EchoConfig(rank=4, chunk_size=4))
    cache = generation_cache(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0)),
              past_key_values=cache, use_cache=True)
    layer = next(layer for layer in cache.state("echo").layers.values() if layer.is_initialized)
    phases = layer.phases
    assert phases is not None and len(set(phases)) == 1
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    assert layer.phases == (phases[0],) * 3 and layer.seen.shape[0] == 3
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer.phases == (phases[0],) * 2
    layer.batch_select_indices(torch.tensor([True, False]))
    assert layer.phases is None
    layer.update(layer.state, layer.seen, (1, 2))
    layer.reorder_cache(torch.tensor([0]))
    assert layer.phases is None


# -- the window-only control -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_window_only_control_has_no_echo_state_and_trains_a_stacked_lora_by_distillation(family):
    """echo_branch=False: the window attention alone (the logits of a fresh replace-mode Echo, whose W_o = 0),
    no Echo parameters or state; a LoRA stacked on it gets the distillation gradient and generation with the
    window cache equals the full forward."""
    from graftlm.adapters import LoRAConfig

    fresh = logits(attach_adapter(build_tiny_model(family), echo_config("replace", window=4)))
    model = attach_adapter(build_tiny_model(family), echo_config("replace", window=4, echo_branch=False,
                                                                 distill_weight=1.0))
    graft = model.grafts["default"]
    assert not list(graft.parameters()) and torch.equal(logits(model), fresh)
    model = attach_adapter(model, LoRAConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]), "lora")
    terms = graft.training_loss(model, {"input_ids": IDS})
    assert terms["distill_loss"] > 0
    terms["loss"].backward()
    lora_grads = [p.grad for p in model.graft_parameters()]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(0.1)
    prompt = IDS[:, :13]
    out, decoded = generate_logits(model, prompt, 9)
    assert out.past_key_values.state("echo").layers == {}
    torch.testing.assert_close(decoded, logits(model, out.sequences)[:, prompt.shape[1] - 1:-1], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="echo_branch"):
        EchoConfig(mode="parallel", echo_branch=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_observed_layers_see_what_the_distillation_compares_and_leave_the_output_alone(family):
    model = attach_adapter(build_tiny_model(family), echo_config("replace", distill_weight=1.0))
    perturb(model)
    graft = model.grafts["default"]
    before = logits(model)
    seen = {}
    with graft.observe_layers(lambda i, teacher, window, echo: seen.__setitem__(i, (teacher, window, echo))):
        during = logits(model)
    assert torch.equal(during, before)  # the full attention is computed beside the window, not instead of it
    assert sorted(seen) == graft.layer_indices and not graft._pending
    torch.manual_seed(0)
    lm_loss, distill = graft.loss_terms(model, {"input_ids": IDS})
    mse = torch.stack([torch.nn.functional.mse_loss(w + e, t) for t, w, e in seen.values()]).mean()
    torch.testing.assert_close(distill, mse)  # the same forward, so the same per-layer terms
    assert lm_loss.requires_grad and distill.requires_grad
    (w_o,) = torch.autograd.grad(distill, graft.branches[str(graft.layer_indices[0])].w_o.weight)
    assert w_o.abs().sum() > 0
    assert all(not t.requires_grad and not w.requires_grad for t, w, _ in seen.values())
    parallel = attach_adapter(build_tiny_model(family), echo_config("parallel")).grafts["default"]
    with pytest.raises(ValueError, match="replace"), parallel.observe_layers(print):
        pass


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sinks", [0, 1, 6])
def test_sinks_prefill_then_decode_matches_full_forward_with_left_padding(family, sinks):
    """The window cache keeps each row's first ``sinks`` real tokens beside the window, so a left-padded batch
    decodes like its rows alone and like one full forward, also with more sinks than the window."""
    model = attach_adapter(build_tiny_model(family), echo_config("replace", window=3, sink_tokens=sinks,
                                                                 echo_branch=False))
    short, long = IDS[:, :6], IDS[:, 1:12]
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    out, together = generate_logits(model, batch, 10, attention_mask=mask)
    for row, alone_ids in ((0, short), (1, long)):
        _, alone = generate_logits(model, alone_ids, 10)
        torch.testing.assert_close(together[row:row + 1], alone, atol=2e-5, rtol=1e-5)
    full = logits(model, out.sequences, attention_mask=torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1))
    torch.testing.assert_close(together, full[:, batch.shape[1] - 1:-1], atol=2e-5, rtol=1e-5)
    layer = out.past_key_values.layers[model.grafts["default"].layer_indices[-1]]
    assert layer.keys.shape[-2] == 2 + (sinks + pad if sinks else 0)  # window - 1, and the sinks' span


def test_a_window_cache_with_sinks_refuses_what_it_cannot_undo():
    layer = EchoWindowLayer(sliding_window=3, sinks=2)
    keys = torch.randn(1, 1, 4, 2)
    layer.update(keys, keys)
    layer.crop(-1)  # nothing dropped yet: an ordinary crop
    assert layer.keys.shape[-2] == 3 and layer.get_seq_length() == 3
    returned, _ = layer.update(keys, keys)  # 7 tokens: the 2 sinks and the last 2 kept
    assert returned.shape[-2] == 7 and layer.get_seq_length() == 7
    assert torch.equal(layer.keys, torch.cat([keys[:, :, :2], keys[:, :, 2:]], dim=2))  # sinks k0 k1, then k2' k3'
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        layer.crop(-1)
    with pytest.raises(ValueError, match="sink tokens"):
        layer.activate_past_recording()


def test_an_adapter_saved_before_sink_tokens_existed_loads_without_sinks(tmp_path):
    import json

    model = attach_adapter(build_tiny_model("llama"), echo_config("replace", window=3, sink_tokens=0))
    perturb(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    config_path = next(tmp_path.rglob("adapter_config.json"))
    saved = json.loads(config_path.read_text())
    fields = saved.get("config", saved)
    assert fields.pop("sink_tokens") == 0
    config_path.write_text(json.dumps(saved))
    loaded = attach_adapter(build_tiny_model("llama"), str(config_path.parent))
    assert loaded.grafts["default"].config.sink_tokens == 0
    assert torch.equal(logits(loaded), expected)
    assert EchoConfig().sink_tokens == 4  # a new config has sinks


@pytest.mark.parametrize("family", FAMILIES)
def test_head_distillation_trains_the_projections_at_init_and_compares_the_readout_with_what_the_window_misses(
        family):
    """W_o = 0 at init: the output distillation reaches only W_o, the head term every other Echo parameter
    (and a W_o only through the later layers' readouts). The head term is the mean over layers of MSE(y, full - window) per query head, y the branch's readout."""
    model = attach_adapter(build_tiny_model(family), echo_config("replace", window=4, value_dim=None,
                                                                 distill_weight=1.0, head_distill_weight=2.0))
    graft = model.grafts["default"]
    terms = graft.training_loss(model, {"input_ids": IDS})
    assert set(terms) == {"loss", "lm_loss", "distill_loss", "head_distill_loss"}
    assert terms["head_distill_loss"] > 0
    torch.testing.assert_close(terms["loss"],
                               terms["lm_loss"] + terms["distill_loss"] + 2.0 * terms["head_distill_loss"])
    graft._forward_terms(model, {"input_ids": IDS})[2].backward()  # the head term alone
    for index, branch in graft.branches.items():
        for name in ("w_q", "w_k", "w_v"):
            assert getattr(branch, name).weight.grad.abs().sum() > 0, (index, name)
        assert branch.eta.grad.abs().sum() > 0
    last = graft.branches[str(graft.layer_indices[-1])]  # no compared readout lies after the last layer's W_o
    assert last.w_o.weight.grad is None or not last.w_o.weight.grad.any()

    readouts, attentions = {}, {}
    record = graft._record_distillation

    def spy(index, attention, echo_out, readout):
        full, window = graft._pending[index]
        readouts[index], attentions[index] = readout.detach(), (full - window).detach().transpose(1, 2)
        record(index, attention, echo_out, readout)

    graft._record_distillation = spy
    head = graft._forward_terms(model, {"input_ids": IDS})[2]
    expected = torch.stack([torch.nn.functional.mse_loss(readouts[i], attentions[i].float())
                            for i in graft.layer_indices]).mean()
    torch.testing.assert_close(head, expected)
    assert all(readouts[i].shape == attentions[i].shape for i in graft.layer_indices)


def test_head_distillation_refuses_a_readout_that_is_not_the_attentions_shape():
    with pytest.raises(ValueError, match="head_distill_weight"):
        EchoConfig(mode="parallel", head_distill_weight=1.0)
    with pytest.raises(ValueError, match="head_distill_weight"):
        EchoConfig(mode="replace", echo_branch=False, head_distill_weight=1.0)
    with pytest.raises(ValueError, match="num_heads = 4 and value_dim = 16"):
        attach_adapter(build_tiny_model("llama"), echo_config("replace", head_distill_weight=1.0, value_dim=8))
    model = attach_adapter(build_tiny_model("llama"), echo_config("replace", head_distill_weight=1.0, value_dim=None))
    assert model.grafts["default"].supplies_training_loss
