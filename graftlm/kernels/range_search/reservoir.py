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
    """Uniform sample of at most `capacity` keys per (batch, kv head): `sample` [B, H_kv, m, D].

    The draws come from a generator on the keys' device and every index stays there, so `add` makes no
    host sync: each new key either wins its slot or is written to a scratch slot past the sample (the one
    place where several writes may collide, and it is never read).
    """

    def __init__(self, capacity: int = 1024, seed: int = 0):
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self._store: torch.Tensor | None = None  # [B, H_kv, capacity + 1, D], the last slot is scratch
        self._gen: torch.Generator | None = None

    @property
    def sample(self) -> torch.Tensor | None:
        if self._store is None:
            return None
        return self._store[:, :, : min(self.capacity, self.seen)]

    def add(self, keys: torch.Tensor) -> None:
        """Offer new keys [B, H_kv, n, D] to the sample."""
        n = keys.shape[2]
        if n == 0:
            return
        device = keys.device
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        if self._store is None:
            self._store = keys.new_zeros(keys.shape[:2] + (self.capacity + 1, keys.shape[3]))
        cap = self.capacity
        t = torch.arange(self.seen, self.seen + n, device=device)
        draw = torch.rand(n, generator=self._gen, device=device, dtype=torch.float64)
        slot = torch.where(t < cap, t, (draw * (t + 1)).long()).clamp(max=cap)  # cap = rejected
        arrival = torch.arange(n, device=device)
        # latest key wins each contested slot (Algorithm R's sequential outcome)
        winner = torch.full((cap + 1,), -1, dtype=torch.long, device=device)
        winner.scatter_reduce_(0, slot, arrival, reduce="amax")
        dest = torch.where(winner.index_select(0, slot) == arrival, slot, cap)
        self._store.index_copy_(2, dest, keys.to(self._store.dtype))
        self.seen += n

    def threshold(self, q: torch.Tensor, budget: float) -> torch.Tensor:
        """tau [B, H_q] for queries q [B, H_q, D] keeping about `budget` of all keys."""
        if self._store is None:
            return q.new_full(q.shape[:-1], -float("inf"), dtype=torch.float32)
        return sample_threshold(q, self.sample, budget)
