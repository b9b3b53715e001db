"""The dtype policy every graft follows (written once here; each graft's docstring points to it).

The frozen base runs in whatever dtype it was loaded in: bfloat16 (or float16) on a GPU, float32 on a
CPU. A graft keeps its own numbers in float32 whatever the base's dtype:

* **parameters**: float32 (`parameter_dtype`). `GraftModel.add_graft` creates them so; loading an adapter
  casts the saved tensors to the graft's dtype. (Calling ``.to(torch.bfloat16)`` on the whole
  `GraftModel` casts them too, as in peft; don't, load the base in bf16 instead.)
* **computation**: a graft casts the base activations it reads to float32 (`compute_dtype`), computes in
  float32 and casts what it hands back to the base to the base's dtype (`to_base`). That keeps a fresh
  adapter bit-exact in bf16: adding a float32 zero and rounding back to bf16 returns the bf16 input.
* **solver state and recall statistics**: float32. The Attractor's head and its fixed-point solve run in
  float32 under a bf16 base: a bf16 map can't get its relative residual below bf16's resolution (~4e-3),
  far above the solver's tolerance (1.5e-4). Echo's running statistics and r x r solves are float32
  with compensated (Kahan) sums for G and M in decode (``graftlm.kernels.echo``); ``stats_dtype="float64"``
  stays available where a device does float64 fast.
* **autocast**: under ``torch.autocast`` (accelerate's ``mixed_precision="bf16"``) matmuls would run in
  bf16 regardless of their inputs' dtype; the float32 parts above run inside `full_precision`, which turns
  autocast off for them. The base's own layers still autocast.

Per graft: SST blends in float32, its states are FFN outputs in the base's dtype; the Attractor's head,
KV cache and solve are float32; Echo's projections and statistics are float32; LoRA's matrices are
float32 (peft casts its output back); range search has no parameters and softmaxes its kept keys in
float32, returning the attention output in the query's dtype. ``tests/test_dtype_policy.py`` checks all
of it on a CPU in bf16, fresh-adapter exactness included.

float64 is used only where a test shows it is needed and a device does it fast: the Anderson solver's
n x n least squares (n <= m = 5, microseconds on any device) and the float64 inputs of float64 tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

GRAFT_DTYPE = torch.float32


def parameter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a graft's parameters on a base of ``base_dtype``: float32 (float64 on a float64 base)."""
    return torch.float64 if base_dtype == torch.float64 else GRAFT_DTYPE


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a graft computes in when it reads the base activation ``x``: float32, or float64 for a
    float64 ``x`` (never lower than float32)."""
    return torch.promote_types(x.dtype, GRAFT_DTYPE)


def to_graft(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the graft's compute dtype (a no-op when it already is)."""
    return x.to(compute_dtype(x))


def to_base(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What a graft hands back to the base, in the dtype of the base activation ``like``."""
    return y if y.dtype == like.dtype else y.to(like.dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Turn autocast off for the block on ``device``'s type (a no-op when autocast is not on there)."""
    device_type = torch.device(device).type
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
