"""SST's gates and blend weights can't die: every grafted layer keeps receiving gradient wherever training
moves its parameters (issue 13: a clamped gate pushed below 0 had no gradient again)."""

import pytest
import torch
from graft_fixtures import build_tiny_model

from graftlm import SSTConfig, attach_adapter
from graftlm.adapters.sst import fold_unit
from graftlm.host_syncs import HostSyncCounter

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14, 99, 7], [5, 8, 13, 21, 34, 55, 89, 4, 6, 10, 16, 26, 42]])


def test_fold_unit_stays_in_the_unit_interval_with_unit_slope_everywhere():
    x = torch.cat([torch.linspace(-7.5, 7.5, 301), torch.arange(-6.0, 7.0), torch.tensor([-1e4, 1e4 + 0.25])])
    x.requires_grad_(True)
    y = fold_unit(x)
    assert float(y.detach().min()) >= 0.0 and float(y.detach().max()) <= 1.0
    y.sum().backward()
    assert torch.equal(x.grad.abs(), torch.ones_like(x))  # integers (the kinks) included
    assert torch.equal(fold_unit(torch.tensor([0.0, 0.25, 1.0, 1.25, 2.0, -0.25])),
                       torch.tensor([0.0, 0.25, 1.0, 0.75, 0.0, 0.25]))


def layer_gradients(model):
    graft = model.grafts["default"]
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    return graft.gate_unfolded.grad.clone(), graft.blend_unfolded.grad.clone()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_coordinates_far_past_every_bound_still_get_gradient(family):
    depth = {"num_hidden_layers": 6}
    if family == "gemma3":
        depth["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    model = attach_adapter(build_tiny_model(family, **depth), SSTConfig())
    graft = model.grafts["default"]
    model.train()
    layers = len(graft.layer_indices)
    with torch.no_grad():  # below 0, above 1, many periods out; none folds to a closed gate
        graft.gate_unfolded.copy_(torch.tensor([-0.15, -3.3, 1.7, 9.6, -41.2, 0.5])[:layers])
        graft.blend_unfolded.normal_(0, 50, generator=torch.Generator().manual_seed(1))
    gate, blend = layer_gradients(model)
    assert (gate != 0).all(), gate
    assert (blend != 0).all(dim=1).all()


def test_large_adamw_steps_leave_every_layer_learning():
    """The issue's case: 40 AdamW steps at lr 3e-2 once left 5 of 6 layers of a tiny Llama without gradient.
    Here 40 steps at ten times that rate, then every layer's gate and every blend row still get gradient,
    and every gate has moved."""
    model = attach_adapter(build_tiny_model("llama", num_hidden_layers=6), SSTConfig())
    graft = model.grafts["default"]
    model.train()
    optimizer = torch.optim.AdamW(graft.parameters(), lr=0.3, weight_decay=0.0)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    gate, blend = layer_gradients(model)
    assert (gate != 0).all(), gate
    assert (graft.gates() != 0).all() and (blend != 0).any(dim=1).all()


def test_a_closed_gate_receives_gradient_and_the_blend_follows_once_it_opens(tiny_model):
    model = attach_adapter(tiny_model, SSTConfig())
    graft = model.grafts["default"]
    model.train()
    gate, blend = layer_gradients(model)
    assert (gate != 0).all() and torch.equal(blend, torch.zeros_like(blend))  # c = g a: no blend gradient at g = 0
    with torch.no_grad():
        graft.gate_unfolded.fill_(-0.01)  # a step past the lower bound opens the gate to 0.01 (reflected)
    gate, blend = layer_gradients(model)
    assert (gate != 0).all() and (blend != 0).all(dim=1).all()


def test_blend_min_must_be_positive():
    from graftlm.adapters import GraftConfigError

    with pytest.raises(GraftConfigError, match=r"SSTConfig.blend_min: must be a finite number in \(0.0, 1.0\), got 0.0"):
        SSTConfig(blend_min=0.0, blend_init=0.03)


def test_training_statistics_name_every_grafted_layer(tiny_model):
    model = attach_adapter(tiny_model, SSTConfig(target_layers=[0, -1]))
    graft = model.grafts["default"]
    graft.set_blend(0.05, 0.5)
    with HostSyncCounter() as syncs:
        first = graft.training_statistics()
    assert syncs.counts == {}  # device scalars: the loop reads them once per log line
    first = {k: float(v) for k, v in first.items()}
    last = tiny_model.config.num_hidden_layers - 1
    assert set(first) == {f"sst_{kind}/L{layer}" for kind in ("gate", "blend", "grad") for layer in (0, last)}
    assert first["sst_gate/L0"] == pytest.approx(0.5) and first["sst_blend/L0"] == pytest.approx(0.025)
    assert first["sst_grad/L0"] == 0.0  # no backward yet
    model.train()
    gate, blend = layer_gradients(model)
    after = {k: float(v) for k, v in graft.training_statistics().items()}
    expected = (gate.pow(2) + blend.pow(2).sum(-1)).sqrt()
    assert [after["sst_grad/L0"], after[f"sst_grad/L{last}"]] == pytest.approx(expected.tolist(), rel=1e-5)


def test_parameter_groups_give_the_blend_its_own_rate(tiny_model):
    model = attach_adapter(tiny_model, SSTConfig(lora_r=2, blend_lr=0.05))
    graft = model.grafts["default"]
    lora_group, blend_group = graft.parameter_groups(1e-3)
    assert lora_group["lr"] == 1e-3 and blend_group["lr"] == 0.05
    assert {id(p) for p in blend_group["params"]} == {id(graft.blend_unfolded), id(graft.gate_unfolded)}
    grouped = {id(p) for g in (lora_group, blend_group) for p in g["params"]}
    assert grouped == {id(p) for p in model.graft_parameters()}
    alone = attach_adapter(build_tiny_model("llama"), SSTConfig()).grafts["default"].parameter_groups(2e-2)
    assert len(alone) == 1 and alone[0]["lr"] == 2e-2
