"""SST sticky-note memory on tiny random Llama and Gemma 3 models."""

import pytest
import torch
from graft_fixtures import build_tiny_model, graft_gradients
from test_attach import all_hooks, logits

from graftlm import SSTConfig, attach_adapter

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14, 99, 7]])  # 13 tokens


def family_of(model):
    return "llama" if model.config.model_type == "llama" else "gemma3"


def sst_model(base, a=0.08, gate=1.0, **config):
    model = attach_adapter(base, SSTConfig(**config))
    model.grafts["default"].set_blend(a, gate)
    return model


def forward_logits(model, mode, ids=IDS, mask=None):
    with model.grafts["default"].forward_mode(mode), torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_fresh_adapter_reproduces_base_exactly(tiny_model):
    before = logits(tiny_model)
    model = attach_adapter(tiny_model, SSTConfig())
    assert torch.equal(logits(model), before)
    with model.grafts["default"].forward_mode("exact"):
        assert torch.equal(logits(model), before)


def test_trainable_parameters_are_blend_plus_gates(tiny_model):
    model = attach_adapter(tiny_model, SSTConfig())
    d, layers = tiny_model.config.hidden_size, tiny_model.config.num_hidden_layers
    assert model.get_nb_trainable_parameters()[0] == layers * d + layers
    graft = model.grafts["default"]
    a = graft.blend_weights()
    assert torch.allclose(a, torch.full_like(a, 0.03)) and torch.equal(graft.gates(), torch.zeros(layers))


def test_open_blend_changes_logits_and_every_parameter_gets_gradients(tiny_model):
    model = attach_adapter(tiny_model, SSTConfig())
    graft = model.grafts["default"]
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert (graft.gate_unfolded.grad != 0).all()  # every closed gate can open
    graft.set_blend(0.08, 0.5)
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert (graft.blend_unfolded.grad != 0).all() and (graft.gate_unfolded.grad != 0).all()


def test_blend_changes_the_output(tiny_model):
    before = logits(tiny_model, IDS)
    model = sst_model(tiny_model)
    assert not torch.allclose(forward_logits(model, "exact"), before)


def test_blend_weights_stay_in_bounds(tiny_model):
    model = attach_adapter(tiny_model, SSTConfig(blend_min=0.02, blend_max=0.05))
    graft = model.grafts["default"]
    with torch.no_grad():
        graft.blend_unfolded.normal_(0, 100)
        graft.gate_unfolded.normal_(0, 100)
    a, g = graft.blend_weights().detach(), graft.gates().detach()
    assert float(a.min()) >= 0.02 - 1e-7 and float(a.max()) <= 0.05 + 1e-7
    assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_two_pass_error_is_second_order_in_the_blend(family):
    """Two-pass vs exact: halving a divides the error by about 4 (METHODS.md: O(a^2))."""
    errors = []
    for a in (0.08, 0.04, 0.02):
        model = sst_model(build_tiny_model(family), a=a, blend_min=0.001, blend_max=0.2)
        errors.append(float((forward_logits(model, "two_pass") - forward_logits(model, "exact")).abs().max()))
    assert errors[0] > 0
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.0 < r < 5.0 for r in ratios), (errors, ratios)


def _greedy_decode(model, prompt, steps, mask=None):
    """Prefill then token-by-token decode through a DynamicCache; returns the logits of every position."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, past_key_values=cache, use_cache=True)
        pieces, ids = [out.logits], prompt
        for _ in range(steps):
            next_id = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, next_id], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(next_id)], dim=1)
            out = model(input_ids=next_id, attention_mask=mask, past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    return ids, torch.cat(pieces, dim=1)


def test_exact_prefill_and_decode_equal_the_exact_forward(tiny_model):
    model = sst_model(tiny_model, prefill_mode="exact")
    ids, stepped = _greedy_decode(model, IDS[:, :6], steps=7)
    full = forward_logits(model, "exact", ids)
    torch.testing.assert_close(stepped, full[:, : stepped.shape[1]], rtol=1e-4, atol=1e-5)


def test_two_pass_prefill_then_exact_decode(tiny_model):
    """Two-pass prefill, then decode continues the exact recurrence from pass 2's last states."""
    model = sst_model(tiny_model)
    prompt = IDS[:, :7]
    ids, stepped = _greedy_decode(model, prompt, steps=4)
    torch.testing.assert_close(stepped[:, : prompt.shape[1]], forward_logits(model, "two_pass", prompt))
    # one decode step equals the exact recurrence started from the two-pass prefill's final states
    assert not torch.equal(stepped[:, prompt.shape[1]:], forward_logits(model, "two_pass", ids)[:, prompt.shape[1]:])


def test_generate_uses_the_state(tiny_model):
    model = sst_model(tiny_model, prefill_mode="exact")
    out = model.generate(input_ids=IDS[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected, _ = _greedy_decode(model, IDS[:, :5], steps=6)
    assert torch.equal(out, expected)


def test_left_padded_batch_equals_unpadded_rows(tiny_model):
    model = sst_model(tiny_model, prefill_mode="exact")
    short, long = IDS[:, :5], IDS[:, 2:11]
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    _, batched = _greedy_decode(model, batch, steps=4, mask=mask)
    _, alone_short = _greedy_decode(model, short, steps=4)
    _, alone_long = _greedy_decode(model, long, steps=4)
    torch.testing.assert_close(batched[0, pad:], alone_short[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[1], alone_long[0], rtol=1e-4, atol=1e-5)


def test_save_and_reload_exact(tiny_model, tmp_path):
    model = sst_model(tiny_model, a=0.05, gate=0.7, target_layers=[0, -1])
    with torch.no_grad():
        model.grafts["default"].blend_unfolded.add_(torch.randn_like(model.grafts["default"].blend_unfolded))
    expected = forward_logits(model, "two_pass")
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model(family_of(tiny_model)), tmp_path)
    assert torch.equal(forward_logits(reloaded, "two_pass"), expected)


def test_save_and_reload_with_lora(tiny_model, tmp_path):
    model = sst_model(tiny_model, lora_r=2)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trainable = model.get_nb_trainable_parameters()[0]
    assert trainable > tiny_model.config.num_hidden_layers * (tiny_model.config.hidden_size + 1)
    expected = forward_logits(model, "two_pass")
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model(family_of(tiny_model)), tmp_path)
    assert torch.equal(forward_logits(reloaded, "two_pass"), expected)


def test_residual_state_source(tiny_model):
    model = sst_model(tiny_model, state_source="residual", prefill_mode="exact")
    ids, stepped = _greedy_decode(model, IDS[:, :6], steps=3)
    torch.testing.assert_close(stepped, forward_logits(model, "exact", ids)[:, : stepped.shape[1]],
                               rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    model = sst_model(tiny_model, a=0.05, gate=0.5)
    model.train()

    plain = graft_gradients(model, IDS)
    model.gradient_checkpointing_enable()
    checkpointed = graft_gradients(model, IDS)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_detach_and_disable_are_exact(tiny_model):
    before = logits(tiny_model)
    hooks = all_hooks(tiny_model)
    model = sst_model(tiny_model)
    with model.disable_adapter():
        assert torch.equal(logits(model), before)
    base = model.detach()
    assert torch.equal(logits(base), before) and all_hooks(base) == hooks


# -- latent deliberation and the halting probe ------------------------------------------------------
from graftlm.adapters.sst_deliberation import (
    collect_depth_labels,
    fit_halting_probe,
    generate_at_depths,
    generate_with_deliberation,
    probe_depths,
)


def test_deliberation_with_closed_gate_equals_base_generation(tiny_model):
    expected = tiny_model.generate(input_ids=IDS[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    model = attach_adapter(tiny_model, SSTConfig())
    for depth in (1, 4):
        out = generate_with_deliberation(model, IDS[:, :6], max_new_tokens=5, depth=depth)
        assert torch.equal(out.sequences, expected)


def test_depth_one_equals_generate_with_exact_prefill(tiny_model):
    model = sst_model(tiny_model, prefill_mode="exact")
    expected = model.generate(input_ids=IDS[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generate_with_deliberation(model, IDS[:, :6], max_new_tokens=5, depth=1).sequences, expected)


def test_deliberation_changes_outputs_and_per_row_depths_match_single_rows(tiny_model):
    model = sst_model(tiny_model, a=0.1, gate=1.0, prefill_mode="exact")
    graft = model.grafts["default"]
    prompt = torch.cat([IDS[:, :7], IDS[:, 3:10]])
    per_row = generate_with_deliberation(model, prompt, max_new_tokens=4, depth=torch.tensor([1, 3]))
    row0 = generate_with_deliberation(model, prompt[:1], max_new_tokens=4, depth=1)
    row1 = generate_with_deliberation(model, prompt[1:], max_new_tokens=4, depth=3)
    assert torch.equal(per_row.sequences[0], row0.sequences[0])
    assert torch.equal(per_row.sequences[1], row1.sequences[0])
    assert per_row.depths.tolist() == [1, 3]
    # a repeat really changes the states (and so the first-answer logits) when the blend is open
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt[:1, :-1], past_key_values=cache, use_cache=True)
        entry = graft.cache_states(cache)
        once = model(input_ids=prompt[:1, -1:], past_key_values=cache, use_cache=True).logits
        after_one = graft.cache_states(cache)
        cache.crop(-1)
        graft.set_cache_states(cache, after_one)
        twice = model(input_ids=prompt[:1, -1:], past_key_values=cache, use_cache=True).logits
    assert entry and not torch.allclose(once, twice)


def test_probe_fits_separable_labels_and_sets_depths(tiny_model, tmp_path):
    model = sst_model(tiny_model)
    graft = model.grafts["default"]
    d = tiny_model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(4, d, generator=generator) * 3
    labels = torch.arange(4).repeat(25) + 1
    features = centres[labels - 1] + 0.3 * torch.randn(100, d, generator=generator)
    assert fit_halting_probe(graft, features, labels) == 1.0
    assert torch.equal(probe_depths(graft, features), labels)
    out = generate_with_deliberation(model, IDS[:, :6], max_new_tokens=3, depth="probe")
    assert out.depths.tolist() == probe_depths(graft, out.features).tolist()
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model(family_of(tiny_model)), tmp_path)
    assert torch.equal(reloaded.grafts["default"].probe_weight, graft.probe_weight)


def test_collect_depth_labels_marks_the_smallest_correct_depth(tiny_model):
    from graft_fixtures import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = sst_model(tiny_model, a=0.1, prefill_mode="exact")
    prompts = ["ab", "hello", "xyz"]
    first = collect_depth_labels(model, tokenizer, prompts, lambda i, text: True, max_new_tokens=2)
    assert first["labels"].tolist() == [1, 1, 1] and first["correct"].all()
    assert first["features"].shape == (3, tiny_model.config.hidden_size)
    calls = {"n": 0}

    def only_depth_three(i, text):
        calls["n"] += 1
        return (calls["n"] - 1) // len(prompts) == 2  # batch of 3 prompts, depths in order 1..4

    labelled = collect_depth_labels(model, tokenizer, prompts, only_depth_three, max_new_tokens=2)
    assert labelled["labels"].tolist() == [3, 3, 3]


def test_deliberation_past_the_sliding_window_of_gemma():
    """Repeats crop the cache; Gemma's sliding-window layers must roll back past a full window."""
    model = sst_model(build_tiny_model("gemma3"), a=0.1, prefill_mode="exact")  # sliding_window = 8
    prompt = IDS[:, :13]
    out = generate_with_deliberation(model, prompt, max_new_tokens=3, depth=2)
    # reference: repeat the last position from a copy of the prefix cache instead of cropping
    import copy

    from transformers import DynamicCache

    graft = model.grafts["default"]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True)
        prefix = copy.deepcopy(cache)
        model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True)
        first = graft.cache_states(cache)
        graft.set_cache_states(prefix, first)
        logits = model(input_ids=prompt[:, -1:], past_key_values=prefix, use_cache=True).logits
    assert out.sequences[0, 13] == logits[0, -1].argmax()


def test_one_prefill_for_every_depth_equals_a_run_per_depth(tiny_model):
    model = sst_model(tiny_model, a=0.1, prefill_mode="exact")
    prompt = torch.cat([IDS[:, :11], IDS[:, 2:13]])  # 11 tokens: past Gemma's sliding window of 8
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    together = generate_at_depths(model, prompt, mask, max_new_tokens=4, depths=(1, 2, 4))
    for depth, out in zip((1, 2, 4), together):
        alone = generate_with_deliberation(model, prompt, mask, max_new_tokens=4, depth=depth)
        assert torch.equal(out.sequences, alone.sequences) and out.depths.tolist() == [depth, depth]
        torch.testing.assert_close(out.first_logits, alone.first_logits)
    assert not torch.equal(together[0].first_logits, together[2].first_logits)  # depth changes the logits
