"""Integration: the two embedded real checkpoints, loaded offline (converted once from GGUF, then cached)."""

import math

import pytest
import torch
from graft_fixtures import FFNBiasConfig
from test_attach import perturb

from graftlm import LoRAConfig, attach_adapter, load_model
from graftlm.models import embedded_checkpoint_dir

pytestmark = pytest.mark.integration

SENTENCE = (
    "The capital of France is Paris. It is known for the Eiffel Tower, its museums and its food. "
    "Every year, millions of tourists visit the city."
)
ROUND_TRIP = [
    "Hello world!",
    "  two  spaces\tand a tab\nnewline\n\nblank line",
    "Ünïcödé — café 東京 😀",
    "x = [1, 2, 3]; print(x[0]**2)",
    "1234567890 + 98765 = 1111111",
    " leading space",
]
EXPECTED = {
    "smollm2-135m": ("LlamaForCausalLM", 576, 30, 134_515_008),
    "gemma-3-270m": ("Gemma3ForCausalLM", 640, 18, 268_098_176),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def real(request):
    model, tokenizer = load_model(request.param)
    return request.param, model, tokenizer


def test_loads_offline_with_expected_shape(real):
    name, model, tokenizer = real
    architecture, hidden, layers, params = EXPECTED[name]
    assert type(model).__name__ == architecture
    assert model.config.hidden_size == hidden and model.config.num_hidden_layers == layers
    assert sum(p.numel() for p in model.parameters()) == params
    assert (embedded_checkpoint_dir(name) / "model.safetensors").exists()
    assert tokenizer.pad_token is not None


def test_tokenizer_round_trips_and_perplexity_is_sane(real):
    _name, model, tokenizer = real
    for text in ROUND_TRIP:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    batch = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch.input_ids).loss
    perplexity = math.exp(loss.item())
    # A random model scores ~vocab size (49k / 262k); these score ~12 and ~9 on this plain sentence.
    assert perplexity < 40, perplexity


def test_attach_save_reload_detach(real, tmp_path):
    name, model, tokenizer = real
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids[:, :23]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    grafted = attach_adapter(model, FFNBiasConfig(target_layers=[0, 5]))
    grafted = attach_adapter(grafted, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="lora")
    try:
        with torch.no_grad():
            assert torch.equal(grafted(input_ids=ids).logits, base)
        perturb(grafted)
        with torch.no_grad():
            expected = grafted(input_ids=ids).logits
        assert not torch.equal(expected, base)
        grafted.save_pretrained(tmp_path)
        fresh, _ = load_model(name)
        reloaded = attach_adapter(fresh, tmp_path)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, expected)
    finally:
        detached = grafted.detach()
    with torch.no_grad():
        assert torch.equal(detached(input_ids=ids).logits, base)
