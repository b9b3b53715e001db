"""The block index of the fast and certified range-search modes: keys in contiguous blocks, one matmul of
block statistics per decode step (METHODS.md section 4; issue 19).

The exact mode (`index.RangeSearchIndex`) proves which keys satisfy q . k >= tau, but on real keys its
bounds prune almost nothing. The block index instead keeps every key of a kv head in blocks of
``block_keys`` keys that sit side by side in memory, so the keys of a chosen block are one contiguous read,
and scores all blocks at once from per-block statistics:

* the log-mass estimate (a Gaussian moment-generating function with the block's mean c and per-dimension
  variance s^2, the ordering signal that came closest to the oracle on captured keys; issue 19):

      log m_b(q) ~= log n_b + a q . c_b + (a^2 / 2) (q * q) . s_b^2        (a = the softmax scale)

  which is exact for Gaussian keys and an estimate otherwise;
* an upper bound on every score in the block (a box bound, for the certified mode): for keys with
  per-dimension extremes [lo_b, hi_b],

      q . k <= sum_d max(q_d hi_d, q_d lo_d) = relu(q) . hi_b + relu(-q) . (-lo_b)            (box bound)

  plus a float-safety margin eps |q| . max(|lo_b|, |hi_b|) (eps = `index.safety_eps`), so that the bound
  also dominates the float32 score the attention computes. log n_b + a * bound is then an upper bound on
  the block's log-mass.

Both are a single batched matmul of an augmented query against a stats matrix: [G, H_q/H_kv, A] x
[G, A, M], A = 2D + 1 (estimate) or 3D + 1 (bound).

Layout. Keys arrive in position order. Everything before the last ``window`` positions is moved into
blocks in flushes of whole chunks: at the first decode step every full chunk of ``flush_keys`` keys (in
groups of up to ``cluster_keys`` keys), later one chunk each time ``flush_keys`` new keys have left the
window. Within a chunk the keys are permuted once, per kv head, by a balanced PCA tree
(`index.pca_tree_order`), so that a block holds similar keys and its statistics are tight (on the captured
keys this beat positional blocks, Quest's layout, for every signal we tried). The permuted keys and values
are copied into the block store; positions not yet flushed (the "tail", always >= ``window`` keys) stay in
the cache and are always attended exactly.

Always-attended blocks. A key is put first in its chunk, into blocks that are always attended exactly
("forced" blocks), when it is one of a row's first ``n_sink`` real tokens or when its norm is off the
chunk's median key norm by more than ``outlier_norm`` of it: on SmolLM2 a few low-norm keys (document
separators) carry most of a head's mass in mid layers, and a block's Gaussian estimate cannot see one
outlier among 15 ordinary keys (issue 19). Padded positions (left padding) go last, into slots marked
invalid, never attended.

Shapes (G = B * H_kv rows; M blocks per row, the same for every row; bs = block_keys):
    keys, values  [G, M, bs, D], [G, M, bs, D_v]  (the cache's dtype)
    valid         [G, M, bs]   bool, slot holds a real key
    positions     [G, M, bs]   long, the key's position in the cache (-1 for an empty slot)
    est_stats     [G, M, 2D+1] float32: (c, s^2, log n)  (log n = -1e30 for an empty or a forced block)
    box_stats     [G, M, 3D+1] float32: (hi, -lo, max|.|, log n)   (only with bounds=True)
    forced        [G, M]       bool, an always-attended block
    forced_ids    [G, F]       long, the forced blocks of each row first (padded, see forced_valid)
    forced_valid  [G, F]       bool
    exact_keys    [G, F * bs, D], exact_values, exact_valid [G, F * bs]: the forced blocks' keys side by side
    selectable    [G]          long, blocks that are neither forced nor empty
    plain_order   [G, M]       long, those blocks first (what a dense row reads on the Triton path)
"""

from __future__ import annotations

import math

import torch

from .index import pca_tree_order, safety_eps

NO_MASS = -1e30  # log n of an empty block: finite, so that 0 * it stays 0 inside a matmul


def chunk_sizes(n: int, flush_keys: int, cluster_keys: int) -> list[int]:
    """Split n (a multiple of flush_keys) into chunks of at most cluster_keys keys, each a power-of-two
    multiple of flush_keys (so the PCA tree's leaves line up with the blocks)."""
    sizes, left = [], n
    while left:
        size = cluster_keys
        while size > left:
            size //= 2
        size = max(size, flush_keys)
        sizes.append(size)
        left -= size
    return sizes


class BlockIndex:
    """Contiguous key blocks with per-block statistics for one layer's KV cache (see module docstring).

    `sync(keys, values, key_mask)` brings the index up to the cache at each decode step; `log_mass_estimates`
    and `log_mass_bounds` score every block with one matmul; `tail_slice` is the cache range attended
    exactly besides the forced blocks.
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        head_dim_v: int,
        *,
        block_keys: int = 16,
        flush_keys: int = 256,
        cluster_keys: int = 1024,
        window: int = 256,
        n_sink: int = 4,
        outlier_norm: float = 0.3,
        bounds: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if flush_keys % block_keys or cluster_keys % flush_keys:
            raise ValueError(f"flush_keys ({flush_keys}) must be a multiple of block_keys ({block_keys}) and "
                             f"cluster_keys ({cluster_keys}) a multiple of flush_keys")
        self.batch, self.n_kv_heads, self.head_dim, self.head_dim_v = batch, n_kv_heads, head_dim, head_dim_v
        self.block_keys, self.flush_keys, self.cluster_keys = block_keys, flush_keys, cluster_keys
        self.window, self.n_sink, self.outlier_norm = window, n_sink, outlier_norm
        self.bounds = bounds
        self.eps = safety_eps(head_dim)
        self.device = torch.device(device)
        g, bs = batch * n_kv_heads, block_keys
        self.keys = torch.zeros(g, 0, bs, head_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(g, 0, bs, head_dim_v, dtype=dtype, device=self.device)
        self.valid = torch.zeros(g, 0, bs, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(g, 0, bs, dtype=torch.long, device=self.device)
        self.est_stats = torch.zeros(g, 0, 2 * head_dim + 1, device=self.device)
        self.box_stats = torch.zeros(g, 0, 3 * head_dim + 1, device=self.device) if bounds else None
        self.forced = torch.zeros(g, 0, dtype=torch.bool, device=self.device)
        self.forced_ids = torch.zeros(g, 0, dtype=torch.long, device=self.device)
        self.forced_valid = torch.zeros(g, 0, dtype=torch.bool, device=self.device)
        self.selectable = torch.zeros(g, dtype=torch.long, device=self.device)
        self.plain_order = torch.zeros(g, 0, dtype=torch.long, device=self.device)
        self.exact_keys = torch.zeros(g, 0, head_dim, dtype=dtype, device=self.device)
        self.exact_values = torch.zeros(g, 0, head_dim_v, dtype=dtype, device=self.device)
        self.exact_valid = torch.zeros(g, 0, dtype=torch.bool, device=self.device)
        self.n_blocked = 0
        self.n_keys = 0
        self.n_flushes = 0

    @property
    def n_blocks(self) -> int:
        return self.keys.shape[1]

    # ------------------------------------------------------------------ building
    def sync(self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None = None) -> None:
        """Follow the cache keys / values [B, H_kv, N, D(_v)] (key_mask [B, N], True = real): flush every whole
        chunk of flush_keys keys that has left the last ``window`` positions."""
        n = keys.shape[2]
        if n < self.n_keys:
            raise ValueError(f"the cache shrank from {self.n_keys} to {n} keys; rebuild the index")
        self.n_keys = n
        ready = max(0, n - self.window - self.n_blocked) // self.flush_keys * self.flush_keys
        if not ready:
            return
        sizes = chunk_sizes(ready, self.flush_keys, self.cluster_keys) if self.n_blocked == 0 else \
            [self.flush_keys] * (ready // self.flush_keys)
        chunks = []
        for size in sizes:
            chunks.append(self._chunk_blocks(keys, values, key_mask, self.n_blocked, size))
            self.n_blocked += size
        self._append_blocks(chunks)
        self._refresh_forced_list()

    def _chunk_blocks(self, keys, values, key_mask, start: int, size: int) -> dict[str, torch.Tensor]:
        """The blocks of cache positions [start, start + size): each field of the store for this chunk."""
        b, h, _, d = keys.shape
        g, bs = b * h, self.block_keys
        k = keys[:, :, start:start + size].reshape(g, size, d)
        v = values[:, :, start:start + size].reshape(g, size, -1)
        kf = k.detach().float()
        if key_mask is None:
            real = torch.ones(g, size, dtype=torch.bool, device=k.device)
            sink = (torch.arange(start, start + size, device=k.device) < self.n_sink).expand(g, size)
        else:
            rank = key_mask.long().cumsum(-1)[:, start:start + size]  # 1-based rank of each real key
            real_b = key_mask[:, start:start + size]
            real = real_b.repeat_interleave(h, 0)
            sink = (real_b & (rank <= self.n_sink)).repeat_interleave(h, 0)
        norm = torch.linalg.vector_norm(kf, dim=-1)
        median = norm.masked_fill(~real, math.nan).nanmedian(dim=-1, keepdim=True).values
        outlier = (norm - median).abs() > self.outlier_norm * median
        forced_key = real & (sink | outlier)
        kind = torch.where(forced_key, 0, torch.where(real, 1, 2))  # forced first, padding last
        tree, _ = pca_tree_order(kf, bs)
        rank_in_tree = torch.empty_like(tree).scatter_(1, tree, torch.arange(size, device=k.device).expand(g, size))
        order = (kind * size + rank_in_tree).argsort(dim=1)
        m = size // bs
        pos = (order + start).view(g, m, bs)
        valid = real.gather(1, order).view(g, m, bs)
        kb = k.gather(1, order[..., None].expand(g, size, d)).view(g, m, bs, d)
        vb = v.gather(1, order[..., None].expand(g, size, v.shape[-1])).view(g, m, bs, -1)
        forced = forced_key.gather(1, order).view(g, m, bs).any(-1)
        est, box = self._block_stats(kb.float(), valid)
        for stats in (est, box) if box is not None else (est,):
            stats[..., -1].masked_fill_(forced, NO_MASS)  # forced blocks are attended exactly, never selected
        chunk = {"keys": kb.detach(), "values": vb.detach(), "valid": valid, "positions": torch.where(valid, pos, -1),
                 "est_stats": est, "forced": forced}
        if self.bounds:
            chunk["box_stats"] = box
        return chunk

    def _append_blocks(self, chunks: list[dict[str, torch.Tensor]]) -> None:
        """Append the chunks' blocks to the store: one concatenation per field, however many chunks."""
        for name in chunks[0]:
            setattr(self, name, torch.cat([getattr(self, name)] + [c[name] for c in chunks], 1))
        self.n_flushes += len(chunks)

    def _block_stats(self, kb: torch.Tensor, valid: torch.Tensor):
        """(c, s^2, log n) and, with bounds, (hi, -lo, max|.|, log n) of each block over its valid slots."""
        w = valid.float()[..., None]
        count = w.sum(2)  # [G, m, 1]
        mean = (kb * w).sum(2) / count.clamp(min=1)
        var = (((kb - mean[:, :, None]) ** 2) * w).sum(2) / count.clamp(min=1)
        log_n = torch.where(count > 0, count.clamp(min=1).log(), torch.full_like(count, NO_MASS))
        est = torch.cat([mean, var, log_n], -1)
        if not self.bounds:
            return est, None
        hi = kb.masked_fill(~valid[..., None], -math.inf).amax(2)
        lo = kb.masked_fill(~valid[..., None], math.inf).amin(2)
        empty = count == 0
        hi, lo = hi.masked_fill(empty, 0.0), lo.masked_fill(empty, 0.0)
        return est, torch.cat([hi, -lo, torch.maximum(hi.abs(), lo.abs()), log_n], -1)

    def _refresh_forced_list(self) -> None:
        """forced_ids: each row's forced blocks first (ascending), padded to the largest count (one read of
        that count per flush, not per step), and their keys and values copied side by side (exact_*), so
        that a decode step reads them without a gather."""
        g, bs = self.forced.shape[0], self.block_keys
        counts = self.forced.sum(1)
        width = int(counts.max()) if counts.numel() else 0
        order = (~self.forced).to(torch.int8).argsort(dim=1, stable=True)
        self.forced_ids = order[:, :width]
        self.forced_valid = torch.arange(width, device=self.device) < counts[:, None]
        flat = (torch.arange(g, device=self.device)[:, None] * self.n_blocks + self.forced_ids).reshape(-1)
        self.exact_keys = self.keys.flatten(0, 1).index_select(0, flat).view(g, width * bs, self.head_dim)
        self.exact_values = self.values.flatten(0, 1).index_select(0, flat).view(g, width * bs, self.head_dim_v)
        self.exact_valid = (self.valid.flatten(0, 1).index_select(0, flat).view(g, width, bs)
                            & self.forced_valid[..., None]).view(g, width * bs)
        empty = ~self.valid.any(-1)
        self.selectable = (~self.forced & ~empty).sum(1)
        self.plain_order = (self.forced | empty).to(torch.int8).argsort(dim=1, stable=True)

    # ------------------------------------------------------------------ scoring
    def group_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H_q, D] -> [G, H_q / H_kv, D] float32 (the query heads that read each kv row)."""
        b, h_q, d = q.shape
        if b != self.batch or d != self.head_dim or h_q % self.n_kv_heads:
            raise ValueError(f"query shape {tuple(q.shape)} does not fit the index")
        return q.detach().float().reshape(b * self.n_kv_heads, h_q // self.n_kv_heads, d)

    def log_mass_estimates(self, qg: torch.Tensor, scale: float) -> torch.Tensor:
        """Estimated log softmax mass (unnormalised, log sum_j exp(a q . k_j)) of every block: [G, group, M].

        qg [G, group, D] (`group_queries`); one matmul of (a q, a^2/2 q^2, 1) against (c, s^2, log n).
        """
        aug = torch.cat([scale * qg, (0.5 * scale * scale) * qg * qg, torch.ones_like(qg[..., :1])], -1)
        return torch.matmul(aug, self.est_stats.transpose(1, 2))

    def log_mass_bounds(self, qg: torch.Tensor, scale: float) -> torch.Tensor:
        """Upper bound on each block's log softmax mass: log n_b + a * (box bound + float margin): [G, group, M].

        qg [G, group, D]. Requires ``bounds=True``. The bound dominates the float32 scores of the block's
        keys (see module docstring), so the sum over unattended blocks of exp(bound) bounds their mass.
        """
        if self.box_stats is None:
            raise ValueError("this BlockIndex was built without bounds (bounds=True is needed)")
        aug = torch.cat([scale * qg.clamp(min=0), scale * (-qg).clamp(min=0), (scale * self.eps) * qg.abs(),
                         torch.ones_like(qg[..., :1])], -1)
        ub = torch.matmul(aug, self.box_stats.transpose(1, 2))
        return ub + self.eps * (ub.abs() + 1.0)  # the rounding of this matmul and of exp downstream

    def tail_slice(self) -> slice:
        """Cache positions attended exactly besides the forced blocks (everything not yet in a block)."""
        return slice(self.n_blocked, self.n_keys)

    def memory_bytes(self) -> int:
        """Bytes held by the block store and its statistics (the store is a permuted copy of the K/V cache)."""
        tensors = [self.keys, self.values, self.valid, self.positions, self.est_stats, self.forced,
                   self.forced_ids, self.forced_valid, self.exact_keys, self.exact_values, self.exact_valid]
        if self.box_stats is not None:
            tensors.append(self.box_stats)
        return sum(t.numel() * t.element_size() for t in tensors)
