"""When a layer's decode step plans through the block index and when it goes straight to dense (issue 19).

A planned step (block or certified mode) pays for its plan: the exact part, one matmul of block statistics,
the ordering and one host read. When the plan then reads most of the keys anyway (or every row falls back
to dense), that step costs more than dense attention. So a layer whose plan did not pay decodes densely
(`block_attention.dense_rows`, no planning, no index work) for the next ``interval - 1`` steps, and the
interval doubles after each plan that does not pay, from ``recheck_every`` up to ``recheck_max``; a plan that
pays resets it. Over a long decode on keys that cannot be pruned, a planned step that costs c times dense
then adds at most (c - 1) / recheck_every of dense per step over the first ``recheck_every`` steps, and
(c - 1) / recheck_max in the long run.

"Pays" is judged from the plan alone (host integers, no sync): the share of the layer's keys it reads, a
dense row counting all of its keys, must be at most ``dense_fallback`` (the measured fraction at which one
row's block path costs what its dense attention does), and at least one row must not be dense.
"""

from __future__ import annotations

from .block_attention import BlockPlan
from .blocks import BlockIndex


def plan_read_fraction(plan: BlockPlan, index: BlockIndex) -> float:
    """Share of the layer's keys a plan reads (a dense row: all of them), from the plan's host lists.

    The forced blocks count at the width of the widest row (what the exact part scores)."""
    n = index.n_keys
    if n == 0:
        return 1.0
    exact = n - index.n_blocked + index.exact_keys.shape[1]
    read = sum(n if dense else min(n, exact + count * index.block_keys)
               for count, dense in zip(plan.counts, plan.dense))
    return read / (n * len(plan.counts))


class DenseSchedule:
    """The plan-or-dense decision of one layer across decode steps (module docstring)."""

    def __init__(self, recheck_every: int = 16, recheck_max: int = 256):
        if recheck_every < 1 or recheck_max < recheck_every:
            raise ValueError(f"need 1 <= recheck_every <= recheck_max, got {recheck_every} and {recheck_max}")
        self.recheck_every, self.recheck_max = recheck_every, recheck_max
        self.interval = recheck_every
        self.dense_left = 0
        self.n_planned = 0
        self.n_dense = 0

    def plan_now(self) -> bool:
        """Whether this step plans; a False answer uses up one step of the dense streak."""
        if self.dense_left:
            self.dense_left -= 1
            self.n_dense += 1
            return False
        self.n_planned += 1
        return True

    def record(self, plan: BlockPlan, index: BlockIndex, dense_fallback: float) -> bool:
        """After a planned step: start a dense streak if the plan did not pay. Returns whether it paid."""
        if not isinstance(plan.dense, list):  # the Triton path keeps its plan on the device: never read it
            return True
        paid = not all(plan.dense) and plan_read_fraction(plan, index) <= dense_fallback
        if paid:
            self.interval = self.recheck_every
        else:
            self.dense_left = self.interval - 1
            self.interval = min(2 * self.interval, self.recheck_max)
        return paid
