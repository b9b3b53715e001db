"""What "training memory" means in the fixed-point tests and benchmarks: bytes autograd saves for backward."""

from __future__ import annotations

from collections.abc import Callable

import torch


def autograd_saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (counted once each
    through ``torch.autograd.graph.saved_tensors_hooks``). This is the part of training memory that can
    grow with solver iterations; torch has no CPU peak-memory counter to measure the rest."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())
