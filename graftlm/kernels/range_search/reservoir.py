"""A uniform reservoir sample of the keys seen so far, for estimating tau from a budget.

The paper estimates the per-head threshold from a sample of keys instead of scoring all of them
(METHODS.md section 4, "tau per head: ... estimated from a reservoir sample of keys"). This is
Vitter's Algorithm R, vectorised over a batch of new keys: key number t (0-based over the whole
stream) fills slot t while t < capacity, and otherwise replaces slot j ~ U{0..t} when j < capacity.
The draws are independent, so applying a batch at once with "the latest key wins a contested slot"
gives exactly the sequential algorithm's distribution. Slots are shared by all batch rows and heads
(the same positions are sampled everywhere).
"""

from __future__ import annotations

import torch

from .reference import sample_threshold


class KeyReservoir:
    """Uniform sample of at most `capacity` keys per (batch, kv head): `sample` [B, H_kv, m, D]."""

    def __init__(self, capacity: int = 1024, seed: int = 0):
        self.capacity = capacity
        self.seen = 0
        self.sample: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, keys: torch.Tensor) -> None:
        """Offer new keys [B, H_kv, n, D] to the sample."""
        n = keys.shape[2]
        if n == 0:
            return
        t = torch.arange(self.seen, self.seen + n)
        slot = torch.where(
            t < self.capacity, t, (torch.rand(n, generator=self._gen, dtype=torch.float64) * (t + 1)).long()
        )
        accepted = slot < self.capacity
        if self.sample is None:
            self.sample = keys.new_empty(keys.shape[:2] + (0, keys.shape[3]))
        n_fill = int(min(self.capacity, self.seen + n) - self.sample.shape[2])
        if n_fill > 0:
            pad = keys.new_zeros(keys.shape[:2] + (n_fill, keys.shape[3]))
            self.sample = torch.cat([self.sample, pad], dim=2)
        # latest key wins each contested slot (Algorithm R's sequential outcome)
        winner = torch.full((self.capacity,), -1, dtype=torch.long)
        winner.scatter_reduce_(0, slot[accepted], torch.arange(n)[accepted], reduce="amax")
        slots = torch.nonzero(winner >= 0).squeeze(-1)
        self.sample[:, :, slots.to(keys.device)] = keys[:, :, winner[slots].to(keys.device)]
        self.seen += n

    def threshold(self, q: torch.Tensor, budget: float) -> torch.Tensor:
        """tau [B, H_q] for queries q [B, H_q, D] keeping about `budget` of all keys."""
        if self.sample is None:
            return q.new_full(q.shape[:-1], -float("inf"), dtype=torch.float32)
        return sample_threshold(q, self.sample, budget)
