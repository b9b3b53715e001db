"""Ground truth for the implicit gradients: plain iteration kept on the autograd tape.

``unrolled_picard`` differentiates through every update y_{k+1} = f(y_k), so its memory grows linearly
with n_iter. When the iteration has converged, its gradients equal the implicit-function-theorem
gradients of ``implicit.py`` up to the truncation error (the effect of y0 decays like the contraction
factor to the power n_iter). Tests and ``benchmarks/attractor_solvers.py`` compare against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def unrolled_picard(f: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, n_iter: int) -> torch.Tensor:
    """y_{n_iter} of y_{k+1} = f(y_k), differentiable through every step. y0 [B, ...] -> [B, ...]."""
    y = y0
    for _ in range(n_iter):
        y = f(y)
    return y
