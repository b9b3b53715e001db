"""The host-sync counter sees every kind of sync it names, and nothing in sync-free tensor code."""

import torch

from graftlm.host_syncs import HostSyncCounter


def test_counts_each_kind_of_sync():
    x = torch.arange(6.0)
    mask = x > 2
    with HostSyncCounter() as syncs:
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        int(x[1])
        float(x[2])
        x.cpu()
        x.nonzero()
        torch.nonzero(x)
        x.masked_select(mask)
        torch.unique(x)
        x[mask]
        y = x.clone()
        y[mask] = 0.0
    assert dict(syncs.counts) == {
        "item": 1, "tolist": 1, "__bool__": 1, "__int__": 1, "__float__": 1, "cpu": 1, "nonzero": 2,
        "masked_select": 1, "unique": 1, "bool_mask_index": 2,
    }
    assert syncs.total == 12


def test_sync_free_code_counts_nothing():
    x = torch.randn(4, 8)
    with HostSyncCounter() as syncs:
        y = torch.where(x > 0, x, torch.zeros_like(x)).softmax(-1)
        top = y.topk(2, dim=-1).indices
        torch.gather(y, -1, top)
        x[:, 1:3] = 0.0
        x[torch.tensor([0, 2])]
    assert syncs.total == 0, syncs.counts


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        bool(grad.sum() > 0)
        grad.max().item()
        grad.nonzero()
        grad[grad > 0]
        return 2 * grad


def test_counts_syncs_inside_a_backward_pass():
    x = torch.randn(5, requires_grad=True)
    with HostSyncCounter() as syncs:
        y = _ReadsInBackward.apply(x).exp().sum()
        bool(y > 0)
        y.backward()
    assert dict(syncs.counts) == {"__bool__": 1, "backward_item": 2, "backward_nonzero": 1,
                                  "backward_bool_mask_index": 1}
    with HostSyncCounter() as syncs:
        (x.exp() * 3).sum().backward()  # built-in backwards read nothing
    assert syncs.total == 0, syncs.counts
