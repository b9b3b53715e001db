"""Anderson mixing (type II, Walker & Ni 2011), batched over sequences.

For the fixed-point problem y = f(y) keep the last n <= m iterates X_i and residuals G_i = f(X_i) - X_i
of each sequence (flattened to N numbers) and pick the affine combination with the smallest residual:

    alpha = argmin_a ||sum_i a_i G_i||^2 + lam' ||a||^2   s.t.  sum_i a_i = 1            (Anderson LS)
          = (H + lam' I)^-1 1 / (1^T (H + lam' I)^-1 1),      H_ij = <G_i, G_j>  (Gram, [B, n, n])
    y_next = sum_i alpha_i X_i + beta * sum_i alpha_i G_i                                 (mixing)

beta = 1 takes the combination of the map values f(X_i); beta < 1 damps towards the iterates.
n = 1 is a (damped) Picard step. The regulariser is relative to the newest residual, lam' = lam *
||G_newest||^2 (plus a float64 floor), so lam means the same for hidden states of any scale. Scaling by
the mean of H_ii instead was measured to stall near the tolerance: old residuals are orders of magnitude
larger than the newest, the ridge then swamps the newest ones and pulls alpha toward a uniform average
with stale iterates (on a tied attention + MLP block it took 5 updates where plain iteration took 3).
The n x n solve runs in float64.
A sequence whose solve fails or gives non-finite weights takes a plain Picard step instead.
"""

from __future__ import annotations

import torch


class AndersonHistory:
    """Ring buffers of the last ``m`` iterates X [B, m, N] and residuals G [B, m, N] of each sequence."""

    def __init__(self, batch: int, numel: int, m: int, dtype: torch.dtype, device: torch.device):
        if m < 1:
            raise ValueError(f"Anderson memory m must be >= 1, got {m}")
        self.m = m
        self.x = torch.zeros(batch, m, numel, dtype=dtype, device=device)
        self.g = torch.zeros(batch, m, numel, dtype=dtype, device=device)
        self.count = 0

    def push(self, y: torch.Tensor, fy: torch.Tensor) -> None:
        """Record the iterate y [B, N] and its map value fy [B, N] (both finite)."""
        slot = self.count % self.m
        self.x[:, slot] = y
        self.g[:, slot] = fy - y
        self.count += 1

    def mix(self, beta: float, lam: float) -> torch.Tensor:
        """The next iterate [B, N] by the Anderson LS and mixing equations of the module docstring."""
        n = min(self.count, self.m)
        x, g = self.x[:, :n], self.g[:, :n]
        gram = torch.bmm(g, g.transpose(1, 2)).double()  # [B, n, n]
        scale = gram.diagonal(dim1=1, dim2=2)[:, (self.count - 1) % self.m]  # [B] newest ||G||^2
        ridge = lam * scale + torch.finfo(torch.float64).tiny ** 0.5
        eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
        ones = torch.ones(gram.shape[0], n, 1, dtype=gram.dtype, device=gram.device)
        w, info = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye, ones)
        alpha = (w / w.sum(1, keepdim=True)).squeeze(-1)  # [B, n]
        bad = (info != 0) | ~torch.isfinite(alpha).all(-1)
        latest = torch.zeros_like(alpha)
        latest[:, (self.count - 1) % self.m] = 1.0
        alpha = torch.where(bad[:, None], latest, alpha)  # always applied: testing bad.any() would sync
        alpha = alpha.to(x.dtype).unsqueeze(1)  # [B, 1, n]
        return (torch.bmm(alpha, x) + beta * torch.bmm(alpha, g)).squeeze(1)
