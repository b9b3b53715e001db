"""Host syncs of each graft, counted on a CPU with `HostSyncCounter` (issue 17): per decode step (one token
with the graft's cache) and per training step (forward + backward), on tiny Llama (2 layers) and Gemma 3
(3 layers), with the graft's parameters opened (gates 0.5, zero tensors ~ N(0, 0.02)).

The expected counts are exact, so a change that adds a sync fails here: SST, Echo and LoRA add none per
decode step; the Attractor's solver reads "all stopped?" once per `check_every` updates after
`min_iter` (forward, and the adjoint in the backward: ``backward_item``), plus one read per forward of
whether the head is still closed, and nothing else; Echo reads
the caller's padding mask once per forward (not per layer). Transformers' own mask building makes the
base's syncs, measured alongside.
"""

import pytest
import torch
from graft_fixtures import build_tiny_model, open_grafts

import graftlm
from graftlm.adapters.attractor import AttractorGraft
from graftlm.host_syncs import HostSyncCounter
from graftlm.testing import count_decode_syncs

FAMILIES = ["llama", "gemma3"]
CONFIGS = {
    "sst": lambda: graftlm.SSTConfig(),
    "attractor": lambda: graftlm.AttractorConfig(),
    "echo": lambda: graftlm.EchoConfig(chunk_size=8),
    "echo_replace": lambda: graftlm.EchoConfig(mode="replace", window=8, chunk_size=8, distill_weight=1.0),
    "lora": lambda: graftlm.LoRAConfig(),
}
STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grafted(family: str, name: str):
    return open_grafts(graftlm.attach_adapter(build_tiny_model(family), CONFIGS[name]()))


def decode_syncs(model, with_mask: bool = False):
    """Syncs counted over STEPS one-token forwards after a 24-token prefill; returns (counts, cache)."""
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    return count_decode_syncs(model, ids, STEPS, with_mask)


def training_syncs(model):
    """Syncs of one training step (the graft's training_loss or the LM loss, then backward) on a
    right-padded batch, as the recipes' collator makes it."""
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    model.train()
    grafts = list(getattr(model, "grafts", {}).values())
    with HostSyncCounter() as syncs:
        terms = grafts[0].training_loss(model, batch) if grafts else None
        loss = terms["loss"] if terms is not None else model(**batch).loss
        loss.backward()
    model.eval()
    return dict(syncs.counts)


def plus(*counts: dict) -> dict:
    total: dict = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return {k: v for k, v in total.items() if v}


def solver_checks(iterations: torch.Tensor, min_iter: int, max_iter: int, every: int) -> int:
    """Host reads of one solve whose sequences stopped after ``iterations`` [B] updates (solvers.py)."""
    checks = range(min_iter, max_iter, every)
    last = int(iterations.max())
    reached = [k for k in checks if k >= last]
    return len([k for k in checks if k < last]) + 1 if reached else len(checks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["sst", "echo", "echo_replace", "lora"])
def test_decode_step_makes_no_host_sync(family, name):
    counts, _ = decode_syncs(grafted(family, name))
    assert counts == {}, counts


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_with_a_mask_adds_one_read_per_forward_for_echo_and_none_otherwise(family):
    base, _ = decode_syncs(build_tiny_model(family), with_mask=True)
    assert sum(base.values()) <= STEPS  # transformers' mask building, not ours
    for name in ("sst", "lora", "attractor"):
        model = grafted(family, name)
        counts, cache = decode_syncs(model, with_mask=True)
        if name == "attractor":
            config = model.grafts["default"].config
            reads = sum(solver_checks(it, config.min_iter, config.max_iter, config.check_every)
                        for it in AttractorGraft.cache_iterations(cache)[-STEPS:])
            assert counts == plus(base, {"__bool__": reads + STEPS}), counts  # + 1 per step: is the head closed?
        else:
            assert counts == base, (name, counts)
    for name in ("echo", "echo_replace"):
        counts, _ = decode_syncs(grafted(family, name), with_mask=True)
        assert counts == plus(base, {"tolist": STEPS}), (name, counts)  # one per step, for every layer


@pytest.mark.parametrize("family", FAMILIES)
def test_attractor_decode_reads_only_its_solver_checks(family):
    model = grafted(family, "attractor")
    config = model.grafts["default"].config
    counts, cache = decode_syncs(model)
    per_step = AttractorGraft.cache_iterations(cache)[-STEPS:]
    assert len(per_step) == STEPS and all(it.device.type == "cpu" for it in per_step)
    reads = sum(solver_checks(it, config.min_iter, config.max_iter, config.check_every) for it in per_step)
    assert counts == {"__bool__": reads + STEPS}, counts  # + 1 per step: whether the head is closed
    assert reads <= STEPS * 2  # ~8-10 updates per token here: min_iter = 6, then one check per 4


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stack_on_one_graft_cache_adds_no_decode_sync(family):
    """SST, Echo (parallel) and the Attractor stacked on one `GraftCache`: the decode step
    reads only the Attractor's own solver checks and closed-head read, as alone."""
    model = build_tiny_model(family)
    for name in ("sst", "echo", "attractor"):
        model = graftlm.attach_adapter(model, CONFIGS[name](), adapter_name=name)
    open_grafts(model)
    config = model.grafts["attractor"].config
    counts, cache = decode_syncs(model)
    assert set(cache.graft_states) == {"sst", "echo", "attractor"}
    per_step = AttractorGraft.cache_iterations(cache)[-STEPS:]
    reads = sum(solver_checks(it, config.min_iter, config.max_iter, config.check_every) for it in per_step)
    assert counts == {"__bool__": reads + STEPS}, counts


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_syncs(family):
    base = training_syncs(build_tiny_model(family))
    assert training_syncs(grafted(family, "lora")) == base
    assert training_syncs(grafted(family, "sst")) == plus(base, base)  # two-pass: the base's forward twice
    for name in ("echo", "echo_replace"):  # one read of the padding mask per forward
        assert training_syncs(grafted(family, name)) == plus(base, {"tolist": 1}), name
    model = grafted(family, "attractor")
    counts = training_syncs(model)
    graft = model.grafts["default"]
    config, info = graft.config, graft.last_fixed_point_info
    forward = solver_checks(info.forward.iterations, config.min_iter, config.max_iter, config.check_every)
    adjoint = solver_checks(info.adjoint.iterations, 0, config.adjoint_max_iter, config.check_every)
    # + 1: whether the head is still closed (its weights change every step), read once per forward
    assert counts == plus(base, {"__bool__": forward + 1, "backward_item": adjoint}), counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["block", "certified"])  # the exact mode's tree search still reads per level
def test_range_search_decode_at_most_one_sync_per_layer(family, mode):
    model = graftlm.attach_adapter(build_tiny_model(family),
                                   graftlm.RangeSearchConfig(mode=mode, min_keys=4, window=4, n_sink=1))
    layers = len(model.grafts["default"].layer_indices)
    counts, _ = decode_syncs(model)
    assert sum(counts.values()) <= layers * STEPS, counts
