"""Hook points per architecture, and attention registration through transformers' interfaces."""

import pytest
import torch
from graft_fixtures import build_tiny_model

from graftlm.patches import Gemma3Patch, LlamaPatch, get_patch

IDS = torch.tensor([[5, 9, 33, 2, 71, 100, 18, 3, 44, 27, 6, 90, 13]])


def test_get_patch_picks_the_family(tiny_model):
    patch = get_patch(tiny_model)
    expected = LlamaPatch if tiny_model.config.model_type == "llama" else Gemma3Patch
    assert isinstance(patch, expected)


def test_hook_points_are_the_modules_the_layer_runs(tiny_model):
    """Record the order the layer calls its modules in and check the patch names them right."""
    patch = get_patch(tiny_model)
    layer = patch.decoder_layers(tiny_model)[0]
    calls = []
    named = {
        "attention": patch.attention(layer),
        "ffn_input_norm": patch.ffn_input_norm(layer),
        "mlp": patch.mlp(layer),
        "ffn_output": patch.ffn_output_module(layer),
    }
    captured = {}
    handles = []
    for name, module in named.items():
        def hook(m, args, out, name=name):
            calls.append(name)
            captured.setdefault(name, (args[0] if args else None, out))

        handles.append(module.register_forward_hook(hook))
    handles.append(layer.register_forward_hook(lambda m, a, o: captured.setdefault("layer", o)))
    residual_in = {}
    handles.append(layer.register_forward_pre_hook(lambda m, a: residual_in.setdefault("x", a[0])))
    with torch.no_grad():
        tiny_model(input_ids=IDS)
    for h in handles:
        h.remove()

    order = [c for c in calls if c in ("attention", "ffn_input_norm", "mlp")]
    assert order[:3] == ["attention", "ffn_input_norm", "mlp"]
    h_in, _ = captured["ffn_input_norm"]
    _, ffn_out = captured["ffn_output"]
    # The layer's output is the FFN input residual h plus the FFN branch output.
    torch.testing.assert_close(captured["layer"], h_in + ffn_out)
    assert patch.final_norm(tiny_model) is tiny_model.model.norm
    assert patch.lm_head(tiny_model) is tiny_model.lm_head
    if isinstance(patch, Gemma3Patch):
        assert patch.attention_output_norm(layer) is layer.post_attention_layernorm
        assert patch.layer_types(tiny_model) == ["sliding_attention", "sliding_attention", "full_attention"]
    else:
        assert patch.attention_output_norm(layer) is None
        assert patch.ffn_output_norm(layer) is None


def test_registered_attention_with_mask_matches_sdpa(tiny_model):
    """An attention implementation registered with its mask function reproduces SDPA, padding included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    patch = get_patch(tiny_model)
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ids = torch.cat([IDS, IDS.flip(-1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, attention_mask=mask).logits
    patch.register_attention("graftlm_test_counting", counting_sdpa)
    previous = patch.set_attention_implementation(tiny_model, "graftlm_test_counting")
    try:
        with torch.no_grad():
            got = tiny_model(input_ids=ids, attention_mask=mask).logits
    finally:
        patch.set_attention_implementation(tiny_model, previous)
    assert len(calls) == tiny_model.config.num_hidden_layers
    torch.testing.assert_close(got[1, 4:], expected[1, 4:])
    torch.testing.assert_close(got[0], expected[0])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_describe_reports_shapes(family):
    model = build_tiny_model(family)
    info = get_patch(model).describe(model)
    assert info["hidden_size"] == 64 and info["num_hidden_layers"] == model.config.num_hidden_layers
    assert info["architecture"] == type(model).__name__
