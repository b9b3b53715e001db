"""The dtype policy (graftlm/dtype_policy.py) on a CPU in bf16: a fresh adapter of every graft reproduces the
bf16 base bit for bit (one forward, and prefill + decode with the graft's cache), graft parameters and
their gradients stay float32, the Attractor's solve reaches its float32 tolerance under a bf16 base and
under autocast, and Echo's statistics keep their own dtype."""

import pytest
import torch
from graft_fixtures import build_tiny_model, generation_cache, open_grafts

import graftlm
from graftlm.adapters.echo_cache import EchoCache
from graftlm.dtype_policy import compute_dtype, full_precision, parameter_dtype, to_base
from graftlm.patches.cache_kwarg import with_cache

BF16 = torch.bfloat16
FAMILIES = ["llama", "gemma3"]
FRESH = {
    "sst": lambda: graftlm.SSTConfig(),
    "sst_exact": lambda: graftlm.SSTConfig(train_mode="exact", prefill_mode="exact"),
    "attractor": lambda: graftlm.AttractorConfig(),
    "echo": lambda: graftlm.EchoConfig(chunk_size=4),
    "echo_replace_ramp0": lambda: graftlm.EchoConfig(mode="replace", window=4, chunk_size=4, replace_ramp=0.0),
    "lora": lambda: graftlm.LoRAConfig(r=4),
    "range_search": lambda: graftlm.RangeSearchConfig(),  # short contexts stay dense (min_keys)
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bf16_model(family: str):
    return build_tiny_model(family).to(BF16)


def batch(length: int = 14, seed: int = 5):
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def prefill_and_decode(model, ids, mask, steps: int = 5) -> torch.Tensor:
    """Logits [B, steps, V] of greedy decode steps after a prefill, with the graft's own cache."""
    cache = generation_cache(model)
    outputs = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **with_cache({}, cache), use_cache=True).logits[:, -1:]
        for _ in range(steps):
            token = logits.argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = model(input_ids=token, attention_mask=mask, **with_cache({}, cache), use_cache=True).logits
            outputs.append(logits)
    return torch.cat(outputs, dim=1)


def test_policy_helpers():
    assert parameter_dtype(BF16) == parameter_dtype(torch.float16) == parameter_dtype(torch.float32) == torch.float32
    assert parameter_dtype(torch.float64) == torch.float64
    x = torch.randn(3, dtype=BF16)
    assert compute_dtype(x) == torch.float32 and to_base(x.float() + 0.0, x).dtype == BF16
    assert torch.equal(to_base(x.float() + torch.zeros(3), x), x)  # a float32 zero added is exact in bf16
    with torch.autocast("cpu", dtype=BF16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == BF16
        with full_precision("cpu"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(FRESH))
def test_fresh_adapter_reproduces_the_bf16_base_bit_for_bit(family, name):
    ids, mask = batch()
    base = bf16_model(family)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    expected_decode = prefill_and_decode(base, ids, mask)
    model = graftlm.attach_adapter(bf16_model(family), FRESH[name]())
    assert all(p.dtype == torch.float32 for g in model.grafts.values() for p in g.all_parameters())
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == BF16 and torch.equal(logits, expected)
    assert torch.equal(prefill_and_decode(model, ids, mask), expected_decode)


@pytest.mark.parametrize("family", FAMILIES)
def test_range_search_decode_keeping_every_key_matches_dense_in_bf16(family):
    """budget >= 1 keeps every key: the range-search decode path (not delegated: min_keys = 4) gives the
    dense softmax, up to bf16 rounding of the output (it sums in float32 in another order)."""
    ids, mask = batch(length=20)
    expected = prefill_and_decode(bf16_model(family), ids, mask)
    model = graftlm.attach_adapter(bf16_model(family), graftlm.RangeSearchConfig(budget=1.0, min_keys=4))
    logits = prefill_and_decode(model, ids, mask)
    assert logits.dtype == BF16
    torch.testing.assert_close(logits.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["sst", "attractor", "echo", "lora"])
def test_training_step_on_a_bf16_base_keeps_float32_parameters_and_gradients(family, name):
    ids, mask = batch()
    model = open_grafts(graftlm.attach_adapter(bf16_model(family), FRESH[name]()))
    model.train()
    graft = model.grafts["default"]
    terms = graft.training_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})
    loss = terms["loss"] if terms is not None else model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    parameters = [p for p in graft.all_parameters() if p.requires_grad]
    assert parameters and all(p.dtype == torch.float32 for p in parameters)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in parameters)
    assert any(p.grad.abs().sum() > 0 for p in parameters)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", ["bf16_base", "autocast"])
def test_attractor_solve_reaches_its_tolerance_in_float32(family, setting):
    """A bf16 map could not get its residual below ~4e-3; the head runs in float32 and gets below 1.5e-4."""
    ids, mask = batch()
    base = bf16_model(family) if setting == "bf16_base" else build_tiny_model(family)
    model = open_grafts(graftlm.attach_adapter(base, graftlm.AttractorConfig()))
    graft = model.grafts["default"]
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=setting == "autocast"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    info = graft.last_solve_info
    assert torch.isfinite(logits).all()
    assert info["converged"].all() and (info["residual"] < graft.config.tol).all(), info
    with torch.autocast("cpu", dtype=BF16, enabled=setting == "autocast"):  # and under grad (implicit)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert graft.last_fixed_point_info.forward.converged.all()
    assert graft.last_fixed_point_info.adjoint.converged.all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stats_dtype", ["float32", "float64"])
def test_echo_statistics_keep_their_dtype_on_a_bf16_base_and_under_autocast(family, stats_dtype):
    ids, mask = batch()
    model = open_grafts(graftlm.attach_adapter(bf16_model(family), graftlm.EchoConfig(chunk_size=4,
                                                                                  stats_dtype=stats_dtype)))
    graft = model.grafts["default"]
    cache = graft.make_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = model(input_ids=ids, attention_mask=mask, **with_cache({}, cache), use_cache=True)
    assert isinstance(cache, EchoCache) and out.logits.dtype == BF16 and torch.isfinite(out.logits).all()
    for layer in cache.echo.values():
        assert all(t.dtype == getattr(torch, stats_dtype) for t in layer.state.tensors())
        assert (layer.state.gram_carry is not None) == (stats_dtype == "float32")
