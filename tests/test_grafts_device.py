"""Device-correct by construction (issue 17): every tensor a graft creates in forward, in its cache and in its
kernels is made on the input's device.

On a CPU: the model and its inputs are on the CPU while torch's default device is ``meta``, so any
tensor made without an explicit device (``torch.zeros(n)``, ``torch.arange(n)``, ...) lands on meta, and
mixing it with the CPU tensors fails or leaves meta tensors in the outputs. Prefill with padding, decode
steps with the graft's cache, and a training step (forward + backward) run that way. Caches are built
before the switch, as ``generate`` builds them (transformers' own cache layers make a CPU tensor at
construction and move it on first use; Gemma 3's sliding layers make one at their first update, so
there the cached prefill runs before the switch).

On CUDA (skipped without one): the same runs with the model on the GPU; outputs, caches and gradients
stay on it and match the CPU run.
"""

import pytest
import torch
from graft_fixtures import build_tiny_model, generation_cache, open_grafts

import graftlm
from graftlm.patches.cache_kwarg import with_cache

FAMILIES = ["llama", "gemma3"]
CONFIGS = {
    "sst": lambda: graftlm.SSTConfig(),
    "sst_exact": lambda: graftlm.SSTConfig(prefill_mode="exact"),
    "attractor": lambda: graftlm.AttractorConfig(),
    "echo": lambda: graftlm.EchoConfig(chunk_size=4),
    "echo_replace": lambda: graftlm.EchoConfig(mode="replace", window=4, chunk_size=4, distill_weight=1.0),
    "lora": lambda: graftlm.LoRAConfig(r=4),
    "range_search": lambda: graftlm.RangeSearchConfig(min_keys=4, window=2, n_sink=1, budget=0.5),
}


def inputs(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [2, 12], a left-padded mask for generation and a right-padded one for training."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4)).to(device)
    mask, train_mask = torch.ones_like(ids), torch.ones_like(ids)
    mask[1, :3] = 0
    train_mask[1, -3:] = 0
    return ids, mask, train_mask


def prefill(model, data, cache) -> torch.Tensor:
    ids, mask, _ = data
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **with_cache({}, cache), use_cache=True).logits


def run_graft(model, data, cache, logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Padded prefill (unless its ``logits`` are passed), 3 decode steps with ``cache``, and one training
    step (forward + backward, no cache; forward only for a graft with nothing to train); the tensors they
    return."""
    ids, mask, train_mask = data
    logits = prefill(model, data, cache) if logits is None else logits
    decoded = []
    with torch.no_grad():
        for _ in range(3):
            token = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = model(input_ids=token, attention_mask=mask, **with_cache({}, cache), use_cache=True).logits
            decoded.append(logits)
    model.train()
    graft = model.grafts["default"]
    batch = {"input_ids": ids, "attention_mask": train_mask, "labels": ids.masked_fill(train_mask == 0, -100),
             "use_cache": False}  # as the recipes loop trains
    terms = graft.training_loss(model, batch)
    loss = terms["loss"] if terms is not None else model(**batch).loss
    if loss.requires_grad:  # range search has no trainable tensors: its training forward runs, no backward
        loss.backward()
    model.eval()
    grads = [p.grad for p in graft.all_parameters() if p.requires_grad]
    return {"decoded": torch.cat(decoded, dim=1), "loss": loss.detach(),
            **{f"grad{i}": g for i, g in enumerate(grads) if g is not None}}


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a generation cache holds: KV layers and what the grafts keep on it."""
    found = []

    def walk(value, depth=0):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif depth < 6 and isinstance(value, (list, tuple)):
            for item in value:
                walk(item, depth + 1)
        elif depth < 6 and isinstance(value, dict):
            for item in value.values():
                walk(item, depth + 1)
        elif depth < 6 and hasattr(value, "__dict__") and not isinstance(value, type):
            for item in vars(value).values():
                walk(item, depth + 1)

    walk(cache)
    return found


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_graft_makes_no_tensor_on_the_default_device(family, name):
    torch.manual_seed(0)
    model = open_grafts(graftlm.attach_adapter(build_tiny_model(family), CONFIGS[name]()))
    cache, data = generation_cache(model), inputs("cpu")
    # Gemma 3's sliding cache layers (transformers') make a tensor on the default device at their first
    # update: prefill before the switch there; its training forward still runs the prefill path, uncached.
    logits = prefill(model, data, cache) if family == "gemma3" else None
    torch.set_default_device("meta")
    try:
        results = run_graft(model, data, cache, logits)
    finally:
        torch.set_default_device(None)
    assert all(t.device.type == "cpu" for t in results.values()), {k: t.device for k, t in results.items()}
    assert all(t.device.type == "cpu" for t in cache_tensors(cache))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_graft_runs_on_cuda_with_its_caches_and_matches_the_cpu(family, name):
    torch.manual_seed(0)
    cpu_model = open_grafts(graftlm.attach_adapter(build_tiny_model(family), CONFIGS[name]()))
    expected = run_graft(cpu_model, inputs("cpu"), generation_cache(cpu_model))
    torch.manual_seed(0)
    model = open_grafts(graftlm.attach_adapter(build_tiny_model(family).to("cuda"), CONFIGS[name]()))
    cache = generation_cache(model)
    results = run_graft(model, inputs("cuda"), cache)
    assert all(t.device.type == "cuda" for t in results.values())
    assert all(t.device.type == "cuda" for t in cache_tensors(cache) if t.numel() > 1)
    for key, value in expected.items():
        torch.testing.assert_close(results[key].cpu(), value, atol=2e-3, rtol=2e-3, msg=key)
