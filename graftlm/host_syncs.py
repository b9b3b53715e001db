"""Count the operations that make the host wait for the device (``HostSyncCounter``).

On a GPU every one of these stalls the CPU until the device has caught up: reading a value
(``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``float(t)``), copying to the host (``cpu``, ``numpy``),
and ops whose output size depends on the data (``nonzero``, ``masked_select``,
``unique``, indexing or assigning with a boolean mask). On a CPU they cost nothing, which is why they
creep into hot loops unseen; counting them on a CPU is how the tests keep them out.

    with HostSyncCounter() as syncs:
        model(input_ids=ids, past_key_values=cache)
    assert syncs.total == 0, syncs.counts

Reads made during a backward pass (a custom ``autograd.Function``'s backward, where torch-function
modes are not active) are counted at the ATen level, as ``backward_<kind>``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}
_DATA_DEPENDENT = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique",
}


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


_BACKWARD = {
    "_local_scalar_dense": "item",  # item, bool, int, float of a tensor
    "nonzero": "nonzero",
    "masked_select": "masked_select",
    "_unique2": "unique",
    "unique_dim": "unique",
    "unique_consecutive": "unique",
}


class _BackwardSyncs(TorchDispatchMode):
    """Counts the syncs made while autograd runs a backward, where torch-function modes are not active
    (custom ``autograd.Function`` backwards such as the implicit gradient's adjoint solve, checkpoint
    recomputes). Seen at the ATen level, where every read of a value is ``_local_scalar_dense``."""

    def __init__(self, counts: Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_graph_task_id() != -1:
            name = func.overloadpacket.__name__
            kind = _BACKWARD.get(name)
            if kind is None and name in ("index", "index_put", "index_put_") and len(args) > 1:
                kind = "bool_mask_index" if _has_bool_mask(tuple(i for i in args[1] if i is not None)) else None
            if kind is not None:
                self.counts[f"backward_{kind}"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchFunctionMode):
    """A ``TorchFunctionMode`` that counts host syncs by kind (``counts``) while it is active.

    ``.cpu()`` counts even on a CPU tensor, so a CPU run sees what a GPU run would. ``.to(device)`` does not
    count: on a CPU it cannot tell a copy to the host from a move to the input's own device. Syncs made
    inside a backward pass are counted too, as ``backward_<kind>`` (``item`` for any read of a value).
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._backward = _BackwardSyncs(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self):
        self._backward.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._backward.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._backward.__exit__(exc_type, exc_value, traceback)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _READS.get(func) or _DATA_DEPENDENT.get(func)
        if kind is None and func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            kind = "bool_mask_index" if _has_bool_mask(args[1]) else None
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **kwargs)
