"""The order of micro-batches: seeded per epoch, sharded over processes, addressable by micro-step.

Micro-step ``m`` of process ``rank`` always holds the same examples, so a resumed run (which starts at
``m = step * grad_accum``) sees exactly the data the uninterrupted run would have seen. Every epoch is a
fresh permutation (seed + epoch); the tail that doesn't fill a global batch (batch_size x processes) is
dropped, so all processes always run the same number of equally sized micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from graftlm.recipes.config import RecipeError


class BatchPlan:
    def __init__(self, n_examples: int, batch_size: int, num_processes: int = 1, rank: int = 0, seed: int = 0):
        global_batch = batch_size * num_processes
        if n_examples < global_batch:
            raise RecipeError(
                f"data: the training set has {n_examples} examples, fewer than one global batch "
                f"(train.batch_size {batch_size} x {num_processes} processes = {global_batch})"
            )
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = n_examples // global_batch
        self._epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.n_examples, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def indices(self, micro_step: int) -> list[int]:
        """The example indices of this process's micro-batch number ``micro_step``."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        start = (position * self.num_processes + self.rank) * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def iterate(self, start_micro_step: int = 0) -> Iterator[list[int]]:
        micro_step = start_micro_step
        while True:
            yield self.indices(micro_step)
            micro_step += 1
