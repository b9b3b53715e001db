"""The range-search graft's generation state (METHODS.md section 4): `RangeSearchCacheState`, its part of a
`GraftCache` (a halfspace index over each grafted layer's keys), and the `RangeSearchCache` that holds only it.

Per grafted layer the state holds a `RangeSearchLayerState`:

    index      exact mode: RangeSearchIndex over the layer's keys [B, H_kv, N, D] (product-ball tree per
               kv head); block and certified modes: BlockIndex (keys in contiguous blocks with statistics)
    reservoir  KeyReservoir: a uniform sample of at most ``reservoir_size`` keys per (row, kv head),
               for estimating tau (exact mode, ``threshold="reservoir"``); None otherwise
    n_queries  decode steps answered by the graft (through the index or its dense fallback)
    schedule   DenseSchedule (block and certified modes): whether the next step plans or decodes densely
    last       the last step's (q [B, H_q, D], tau [B, H_q], attended [B, H_q, N] bool), kept only when
               recall tracking is on (tests and the benchmark check retrieval against brute force)

The index follows the cache lazily: `sync(keys)` is called by the attention function at each decode
step with the layer's full key cache (after transformers appended the new key). The first call builds
the index over everything prefill left (prefill itself stays dense and never touches the index); later
calls append the keys that arrived since, which the index buffers and clusters every ``block_size``
keys. Anything that rewrites the cache's past (beam reorder, batch selection, crop, reset) drops the
layer states; the next decode step rebuilds them from the cache, so they can never go stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from graftlm.adapters.graft_cache import GraftCache, GraftState
from graftlm.kernels.range_search import BlockIndex, DenseSchedule, KeyReservoir, RangeSearchIndex

STATE_KEY = "range_search"  # the graft's key in GraftCache.graft_states (its graft type)


class RangeSearchLayerState:
    """The index (and optional key reservoir) of one grafted layer, kept in step with its key cache.

    ``block_options`` (the `BlockIndex` options) selects the block index of the block and certified modes;
    without it the exact mode's tree index is kept with ``index_options``.
    """

    def __init__(self, index_options: dict[str, Any], reservoir_size: int | None, seed: int = 0,
                 block_options: dict[str, Any] | None = None) -> None:
        self.index_options = dict(index_options)
        self.block_options = None if block_options is None else dict(block_options)
        self.reservoir_size = reservoir_size
        self.seed = seed
        self.index: RangeSearchIndex | BlockIndex | None = None
        self.reservoir: KeyReservoir | None = None
        self.n_queries = 0
        self.n_builds = 0
        self.schedule: DenseSchedule | None = None
        self.last: dict[str, torch.Tensor] | None = None

    def block_schedule(self, recheck_every: int, recheck_max: int) -> DenseSchedule:
        """The layer's plan-or-dense schedule (made at the first decode step; dropped with the index)."""
        if self.schedule is None:
            self.schedule = DenseSchedule(recheck_every, recheck_max)
        return self.schedule

    def sync_blocks(self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None) -> BlockIndex:
        """Bring the block index up to the cache (keys / values [B, H_kv, N, D(_v)], key_mask [B, N] or None):
        build it at the first step (or after the cache was rewritten), then flush keys leaving the window."""
        b, h, n, d = keys.shape
        stale = self.index is not None and (self.index.n_keys > n or self.index.batch != b)
        if self.index is None or stale:
            self.index = BlockIndex(b, h, d, values.shape[-1], dtype=keys.dtype, device=keys.device,
                                    **self.block_options)
            self.n_builds += 1
        self.index.sync(keys, values, key_mask)
        return self.index

    def sync(self, keys: torch.Tensor) -> RangeSearchIndex:
        """Bring the index up to the cache's keys [B, H_kv, N, D]: build, append the new ones, or rebuild
        when the cache no longer extends what was indexed (fewer keys or another batch size)."""
        n = keys.shape[2]
        stale = self.index is not None and (self.index.n_keys > n or self.index.batch != keys.shape[0])
        if self.index is None or stale:
            self.index = RangeSearchIndex.build(keys.detach(), **self.index_options)
            self.n_builds += 1
            if self.reservoir_size:
                self.reservoir = KeyReservoir(self.reservoir_size, seed=self.seed)
                self.reservoir.add(keys.detach().float())
        elif self.index.n_keys < n:
            new = keys[:, :, self.index.n_keys:].detach()
            self.index.append(new)
            if self.reservoir is not None:
                self.reservoir.add(new.float())
        return self.index

    def memory_bytes(self) -> int:
        """Bytes held by the index and the reservoir sample."""
        total = self.index.memory_bytes() if self.index is not None else 0
        if self.reservoir is not None and self.reservoir.sample is not None:
            total += self.reservoir.sample.numel() * self.reservoir.sample.element_size()
        return total


class RangeSearchCacheState(GraftState):
    """The range-search graft's state in a `GraftCache`: ``layers[i]`` is grafted layer i's
    `RangeSearchLayerState`. Every rewrite of the cache's past (reorder, select, repeat, crop, reset) drops
    the layer states; the next decode step rebuilds them from the keys, so they never go stale."""

    def __init__(self, grafted_layers: Iterable[int], index_options: dict[str, Any] | None = None,
                 reservoir_size: int | None = None, seed: int = 0,
                 block_options: dict[str, Any] | None = None) -> None:
        self._state_args = (dict(index_options or {}), reservoir_size, seed, block_options)
        self.layers: dict[int, RangeSearchLayerState] = {i: self._new_state() for i in grafted_layers}

    def _new_state(self) -> RangeSearchLayerState:
        return RangeSearchLayerState(*self._state_args)

    def _drop_indexes(self) -> None:
        for layer_idx in self.layers:
            self.layers[layer_idx] = self._new_state()

    def map_rows(self, fn) -> None:
        self._drop_indexes()

    def crop_to(self, length: int, removed: int) -> None:
        if removed:
            self._drop_indexes()

    def reset(self) -> None:
        self._drop_indexes()

    def nbytes(self) -> int:
        """Bytes held by every grafted layer's index and reservoir."""
        return sum(state.memory_bytes() for state in self.layers.values())


class RangeSearchCache(GraftCache):
    """A `GraftCache` holding only a range-search graft's state (``range_search[i]``: grafted layer i's
    `RangeSearchLayerState`). The key/value layers are the base model's own (full or sliding, from its config);
    only full-attention layers are ever grafted. ``RangeSearchGraft.make_cache()`` builds one; a stack generates
    with the one `GraftCache` of `GraftModel.make_cache`, which holds the same state.
    """

    def __init__(
        self,
        config,
        grafted_layers: Iterable[int],
        index_options: dict[str, Any] | None = None,
        reservoir_size: int | None = None,
        seed: int = 0,
        block_options: dict[str, Any] | None = None,
    ) -> None:
        state = RangeSearchCacheState(grafted_layers, index_options, reservoir_size, seed, block_options)
        super().__init__(config, {STATE_KEY: state})

    @property
    def range_search(self) -> dict[int, RangeSearchLayerState]:
        return self.graft_states[STATE_KEY].layers

    def index_bytes(self) -> int:
        """Bytes held by every grafted layer's index and reservoir."""
        return self.graft_states[STATE_KEY].nbytes()
