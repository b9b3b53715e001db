"""The exact halfspace index over a KV cache: a product-ball tree per kv head.

Paper: arXiv 2605.06763 (METHODS.md section 4). The head dimension is split into S contiguous
subspaces (default 4). Keys are grouped into small leaves (about 4 keys) by a balanced PCA tree;
every node of the tree stores, for each subspace s, a centre c_s and a radius rho_s that covers the
s-th sub-vector of every key below it. For any query q and any key k below the node,

    q . k = sum_s q_s . k_s <= sum_s ( q_s . c_s + ||q_s|| rho_s )       (paper's subspace bound)

by Cauchy-Schwarz in each subspace. A node whose bound is below tau cannot hold a key of the range
R(q, tau) = {k : q . k >= tau}, so the whole subtree is pruned; keys in surviving leaves are scored
exactly and filtered. Nothing with q . k >= tau is ever pruned: no false negatives by construction.

Why a joint tree instead of Fagin's threshold algorithm (TA) over S independent per-subspace lists:
TA needs the per-subspace ball bounds in sorted order (a sort or heap per query and head, O(M log M)
for M balls) and evaluates the summed bound one key at a time by random access; its stopping rule is
the same subspace sum. Here the leaves and all their ancestors are shared by the S subspaces, so the
identical summed bound is evaluated for a whole group of keys at once: one comparison can discard
thousands of keys, the work is a level-by-level sweep with no sorting, and it vectorises over heads
and queries. The price is that a subspace's balls are formed jointly with the other subspaces, so a
single leaf's per-subspace radius can be larger than TA's independently clustered balls; the
benchmark reports the resulting pruning honestly.

Float safety. The bound must dominate the float32 score fl(q . k) that the final filter compares
with tau, not only the real one. Every rounding error involved (q . c, the exact score, the norms,
the radii, the parent composition) is at most gamma * sum_s ||q_s|| (||c_s|| + rho_s) with
gamma ~ (2 D + d_s + S + 8) u, u = 2^-24. Radii are therefore stored inflated,
rho'_s = rho_s (1 + eps) + eps ||c_s||, and ||q_s|| is scaled by (1 + eps), with
eps = max(2^-12, 8 D u), which exceeds gamma for every head dim. A non-finite bound (overflow from
huge norms, 0 * inf) never prunes. The margin costs a negligible sliver of pruning power.

Decode: new keys are buffered and, every `block_size` keys (256 as in the paper), clustered into a
small tree of their own whose leaves are appended; only the last node of each upper level is
recomputed. Buffered keys are always returned as candidates, so queries stay exact between flushes.

Layout (G = B * H_kv rows; the tree shape depends only on the key count, so it is shared by rows):
    centres[l]  [G, M_l, D]   float32, node centres (the S subspace centres side by side)
    radii[l]    [G, M_l, S]   float32, inflated subspace radii
    counts[l]   [M_l]         keys below each node
    slots       [G, M_0 * leaf_size]  key id held by each leaf slot, -1 for padding
Node n of level l has children n * fanout ... n * fanout + fanout - 1 in level l - 1.
"""

from __future__ import annotations

import itertools
import math

import torch

_U = 2.0**-24
_ABS_MARGIN = 1e-35


def safety_eps(head_dim: int) -> float:
    """Relative safety margin of the bound for a head dimension D (see module docstring)."""
    return max(2.0**-12, 8 * head_dim * _U)


def subspace_bounds(head_dim: int, n_subspaces: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) of each subspace; sizes differ by at most one."""
    if not 1 <= n_subspaces <= head_dim:
        raise ValueError(f"n_subspaces={n_subspaces} must be in [1, head_dim={head_dim}]")
    edges = [(s * head_dim) // n_subspaces for s in range(n_subspaces + 1)]
    return list(itertools.pairwise(edges))


def subspace_norms(x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """||x_s|| for each subspace: [..., D] -> [..., S]."""
    d = x.shape[-1]
    s = len(bounds)
    if d % s == 0:
        return torch.linalg.vector_norm(x.unflatten(-1, (s, d // s)), dim=-1)
    return torch.stack([torch.linalg.vector_norm(x[..., a:b], dim=-1) for a, b in bounds], dim=-1)


def _segment_ids(n: int, n_segments: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced split of positions 0..n-1 into segments [b_j, b_{j+1}), b_j = j * n // n_segments.

    -> (segment of each position [n], edges [n_segments + 1]), both on ``device``."""
    edges = (torch.arange(n_segments + 1, device=device) * n) // n_segments
    return torch.searchsorted(edges[1:], torch.arange(n, device=device), right=True), edges


def pca_tree_order(x: torch.Tensor, leaf_size: int, power_iters: int = 4) -> tuple[torch.Tensor, int]:
    """Balanced PCA tree: reorder keys so that each leaf is a contiguous run of <= leaf_size keys.

    x [G, n, D] -> (order [G, n] local key ids, n_leaves = 2^L). Level by level, every segment is
    split at its median along its principal direction (power iteration from a fixed start); the
    segment boundaries are j * n // 2^level, so segments of the same level differ by at most one key
    and each level refines the previous one. Degenerate segments (duplicates, zeros) keep their order.
    """
    n = x.shape[1]
    n_leaves = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / leaf_size)))))
    if n % n_leaves == 0:
        return _pca_tree_order_equal(x, n_leaves, power_iters), n_leaves
    return _pca_tree_order_segments(x, n_leaves, power_iters), n_leaves


def _pca_tree_order_segments(x: torch.Tensor, n_leaves: int, power_iters: int) -> torch.Tensor:
    """`pca_tree_order` for any n: segments of unequal size, summed by scatter-adds over segment ids.

    x [G, n, D] -> order [G, n]."""
    g, n, d = x.shape
    order = torch.arange(n, device=x.device).expand(g, n).contiguous()
    init = torch.linspace(1.0, 2.0, d, device=x.device)
    for level in range(int(math.log2(n_leaves))):
        n_seg = 1 << level
        seg, _ = _segment_ids(n, n_seg, x.device)
        xo = x.gather(1, order.unsqueeze(-1).expand(g, n, d))
        count = torch.bincount(seg, minlength=n_seg).clamp(min=1).to(x.dtype)
        mean = x.new_zeros(g, n_seg, d).index_add_(1, seg, xo) / count[:, None]
        xc = xo - mean[:, seg]
        v = init.expand(g, n_seg, d)
        for _ in range(power_iters):
            proj = (xc * v[:, seg]).sum(-1, keepdim=True)
            v = x.new_zeros(g, n_seg, d).index_add_(1, seg, xc * proj)
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-30)
        proj = torch.nan_to_num((xc * v[:, seg]).sum(-1), nan=0.0, posinf=0.0, neginf=0.0)
        by_value = proj.argsort(dim=1, stable=True)
        by_segment = seg[by_value].argsort(dim=1, stable=True)
        order = order.gather(1, by_value.gather(1, by_segment))
    return order


def _pca_tree_order_equal(x: torch.Tensor, n_leaves: int, power_iters: int) -> torch.Tensor:
    """`pca_tree_order` when n_leaves divides n (the block index's chunks): every segment of a level has
    n / 2^level keys, so a level is a view [G, S, n / S, D], reduced along its key axis instead of by
    scatter-adds over segment ids. The same splits as `_pca_tree_order_segments` up to float summation
    order (tests/kernel_tests/test_range_search_blocks.py compares the two).

    x [G, n, D] -> order [G, n]."""
    g, n, d = x.shape
    order = torch.arange(n, device=x.device).expand(g, n).contiguous()
    init = torch.linspace(1.0, 2.0, d, device=x.device, dtype=x.dtype)
    for level in range(int(math.log2(n_leaves))):
        n_seg = 1 << level
        xs = x.gather(1, order.unsqueeze(-1).expand(g, n, d)).view(g, n_seg, n // n_seg, d)
        xc = xs - xs.mean(2, keepdim=True)
        v = init.expand(g, n_seg, 1, d)
        for _ in range(power_iters):  # v <- X_c^T X_c v, one power step on each segment's scatter matrix
            v = (xc * (xc * v).sum(-1, keepdim=True)).sum(2, keepdim=True)  # [G, S, 1, D]
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-30)
        proj = torch.nan_to_num((xc * v).sum(-1), nan=0.0, posinf=0.0, neginf=0.0)  # [G, S, n / S]
        within = proj.argsort(dim=2, stable=True) + (torch.arange(n_seg, device=x.device) * (n // n_seg))[:, None]
        order = order.gather(1, within.view(g, n))
    return order


def _inflate(radius: torch.Tensor, centre_norm: torch.Tensor, eps: float) -> torch.Tensor:
    return radius * (1.0 + eps) + eps * centre_norm


class RangeSearchIndex:
    """Exact index answering R(q, tau) = {k : q . k >= tau} for every head of a decode step.

    Build with `RangeSearchIndex.build(keys)`, keys [B, H_kv, N, D]; grow with `append`; query with
    `candidates` (a superset of R, as flat (row, key) pairs) or `search` (exactly R, as a mask).
    The index stores no copy of the cache except the < block_size keys waiting to be clustered.
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        n_subspaces: int = 4,
        leaf_size: int = 4,
        fanout: int = 4,
        block_size: int = 256,
        start_nodes: int = 256,
        dense_fraction: float = 0.25,
        device: torch.device | str = "cpu",
    ):
        if leaf_size < 1 or fanout < 2 or block_size < 1:
            raise ValueError("leaf_size >= 1, fanout >= 2 and block_size >= 1 are required")
        self.batch, self.n_kv_heads, self.head_dim = batch, n_kv_heads, head_dim
        self.bounds = subspace_bounds(head_dim, n_subspaces)
        self.leaf_size, self.fanout, self.block_size = leaf_size, fanout, block_size
        self.start_nodes = start_nodes
        self.dense_fraction = dense_fraction
        self.eps = safety_eps(head_dim)
        self.device = torch.device(device)
        g = batch * n_kv_heads
        self.centres: list[torch.Tensor] = [torch.zeros(g, 0, head_dim, device=self.device)]
        self.radii: list[torch.Tensor] = [torch.zeros(g, 0, n_subspaces, device=self.device)]
        self.counts: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long, device=self.device)]
        self.slots = torch.zeros(g, 0, dtype=torch.long, device=self.device)
        self.n_indexed = 0
        self.pending = torch.zeros(batch, n_kv_heads, 0, head_dim, device=self.device)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, keys: torch.Tensor, **options) -> RangeSearchIndex:
        """Index all keys [B, H_kv, N, D] at once (prefill)."""
        b, h, _, d = keys.shape
        index = cls(b, h, d, device=keys.device, **options)
        index._add_block(keys)
        return index

    @property
    def n_keys(self) -> int:
        return self.n_indexed + self.pending.shape[2]

    @property
    def n_subspaces(self) -> int:
        return len(self.bounds)

    def append(self, keys: torch.Tensor) -> None:
        """Add decode keys [B, H_kv, n, D]; they are clustered once block_size of them are waiting."""
        self.pending = torch.cat([self.pending, keys.detach().float()], dim=2)
        if self.pending.shape[2] >= self.block_size:
            self.flush()

    def flush(self) -> None:
        """Cluster every waiting key now."""
        if self.pending.shape[2]:
            block, self.pending = self.pending, self.pending[:, :, :0]
            self._add_block(block)

    def _add_block(self, keys: torch.Tensor) -> None:
        g, d = self.batch * self.n_kv_heads, self.head_dim
        n = keys.shape[2]
        if n == 0:
            return
        x = keys.detach().float().reshape(g, n, d)
        order, n_leaves = pca_tree_order(x, self.leaf_size)
        slot_of_pos = self._leaf_slot_positions(n, n_leaves, x.device)
        slots = torch.full((g, n_leaves * self.leaf_size), -1, dtype=torch.long, device=x.device)
        slots[:, slot_of_pos] = order
        centres, radii, counts = self._leaf_stats(x, slots, n_leaves)
        first_leaf = self.centres[0].shape[1]
        self.slots = torch.cat([self.slots, torch.where(slots >= 0, slots + self.n_indexed, slots)], dim=1)
        self.centres[0] = torch.cat([self.centres[0], centres], dim=1)
        self.radii[0] = torch.cat([self.radii[0], radii], dim=1)
        self.counts[0] = torch.cat([self.counts[0], counts])
        self.n_indexed += n
        self._refresh_upper_levels(first_leaf)

    def _leaf_slot_positions(self, n: int, n_leaves: int, device: torch.device) -> torch.Tensor:
        """Slot of each tree position [n]: leaf j holds positions [b_j, b_{j+1}) from slot j * leaf_size."""
        seg, edges = _segment_ids(n, n_leaves, device)
        return seg * self.leaf_size + (torch.arange(n, device=device) - edges[seg])

    def _leaf_stats(self, x: torch.Tensor, slots: torch.Tensor, n_leaves: int):
        """Centre (mean), inflated subspace radii and count of each leaf."""
        g, _, d = x.shape
        valid = (slots[0] >= 0).view(n_leaves, self.leaf_size)
        members = x.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))
        members = members.view(g, n_leaves, self.leaf_size, d).masked_fill(~valid[None, :, :, None], 0.0)
        counts = valid.sum(-1)
        centres = members.sum(2) / counts.clamp(min=1)[None, :, None]
        dist = subspace_norms(members - centres.unsqueeze(2), self.bounds)
        radii = dist.masked_fill(~valid[None, :, :, None], 0.0).amax(2)
        return centres, _inflate(radii, subspace_norms(centres, self.bounds), self.eps), counts

    def _parent_stats(self, centres: torch.Tensor, radii: torch.Tensor, counts: torch.Tensor):
        """Compose parents from groups of `fanout` consecutive children (a ball covering the balls)."""
        f = self.fanout
        g, m, d = centres.shape
        pad = (-m) % f
        if pad:
            centres = torch.cat([centres, centres.new_zeros(g, pad, d)], dim=1)
            radii = torch.cat([radii, radii.new_zeros(g, pad, radii.shape[-1])], dim=1)
            counts = torch.cat([counts, counts.new_zeros(pad)])
        centres = centres.view(g, -1, f, d)
        radii = radii.view(g, -1, f, radii.shape[-1])
        w = counts.view(-1, f)
        parent_counts = w.sum(-1)
        parent = (centres * w[None, :, :, None]).sum(2) / parent_counts.clamp(min=1)[None, :, None]
        reach = subspace_norms(centres - parent.unsqueeze(2), self.bounds) + radii
        reach = reach.masked_fill((w == 0)[None, :, :, None], 0.0).amax(2)
        return parent, _inflate(reach, subspace_norms(parent, self.bounds), self.eps), parent_counts

    def _refresh_upper_levels(self, first_changed: int) -> None:
        level, lo = 1, first_changed
        while self.centres[level - 1].shape[1] > 1:
            lo //= self.fanout
            c, r, w = self._parent_stats(
                self.centres[level - 1][:, lo * self.fanout :],
                self.radii[level - 1][:, lo * self.fanout :],
                self.counts[level - 1][lo * self.fanout :],
            )
            if level == len(self.centres):
                self.centres.append(c[:, :0])
                self.radii.append(r[:, :0])
                self.counts.append(w[:0])
            self.centres[level] = torch.cat([self.centres[level][:, :lo], c], dim=1)
            self.radii[level] = torch.cat([self.radii[level][:, :lo], r], dim=1)
            self.counts[level] = torch.cat([self.counts[level][:lo], w])
            level += 1

    # ------------------------------------------------------------------ querying
    def kv_row_of(self, n_q_heads: int) -> torch.Tensor:
        """kv row (b * H_kv + kv head) read by each query row (b * H_q + q head): [B * H_q]."""
        group = n_q_heads // self.n_kv_heads
        r = torch.arange(self.batch * n_q_heads, device=self.device)
        return (r // n_q_heads) * self.n_kv_heads + (r % n_q_heads) // group

    def _bounds(self, level: int, q, qn, rows, kv_rows, nodes, backend: str = "torch") -> torch.Tensor:
        """Upper bound of q . k over each (row, node) pair: [P] (non-finite -> +inf)."""
        m = self.centres[level].shape[1]
        flat = kv_rows * m + nodes
        centres = self.centres[level].reshape(-1, self.head_dim)
        radii = self.radii[level].reshape(-1, self.n_subspaces)
        if backend == "triton":
            from .triton_kernels import pair_bounds

            return pair_bounds(q, qn, centres, radii, rows, flat, _ABS_MARGIN)
        c = centres.index_select(0, flat)
        r = radii.index_select(0, flat)
        ub = (c * q.index_select(0, rows)).sum(-1) + (r * qn.index_select(0, rows)).sum(-1)
        return _finite_or_inf(ub + _ABS_MARGIN)

    def _dense_bounds(self, level: int, q: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        """Upper bounds for every node of a level: [B * H_q, M_level]."""
        b, h = self.batch, self.n_kv_heads
        group = q.shape[0] // (b * h)
        c = self.centres[level].view(b, h, -1, self.head_dim)
        r = self.radii[level].view(b, h, -1, self.n_subspaces)
        qg = q.view(b, h, group, self.head_dim)
        ub = torch.matmul(qg, c.transpose(-1, -2)) + torch.matmul(qn.view(b, h, group, -1), r.transpose(-1, -2))
        return _finite_or_inf(ub.reshape(b * h * group, -1) + _ABS_MARGIN)

    def _top_level(self) -> int:
        """The level traversal starts from: the lowest level with at most start_nodes nodes."""
        return next(lv for lv in range(len(self.centres)) if self.centres[lv].shape[1] <= self.start_nodes)

    def candidate_fraction(self, q: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Upper bound on the fraction of keys `candidates` can return per query row, from the top level of
        the tree alone (keys below surviving top nodes, plus the waiting keys): [B * H_q] float32.

        One matmul over <= start_nodes nodes per head; the caller uses it to send rows the index cannot
        prune to a dense scan before paying for the traversal.
        """
        b, h_q, d = q.shape
        if not self.n_indexed:
            return torch.ones(b * h_q, device=self.device)
        qf = q.detach().float().reshape(b * h_q, d).to(self.device)
        qn = subspace_norms(qf, self.bounds) * (1.0 + self.eps)
        top = self._top_level()
        keep = self._dense_bounds(top, qf, qn) >= tau.detach().float().reshape(-1, 1).to(self.device)
        below = (keep.float() * self.counts[top].float()).sum(-1)
        return (below + self.pending.shape[2]) / self.n_keys

    def candidates(
        self, q: torch.Tensor, tau: torch.Tensor, backend: str = "torch", rows_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A superset of R(q, tau) for each query row, as flat pairs.

        q [B, H_q, D], tau [B, H_q] -> (rows [P], key_ids [P]) with row = b * H_q + h; every key
        with q . k >= tau is among the pairs (keys in pruned subtrees provably fall below tau).
        backend "triton" scores the node bounds with `triton_kernels.pair_bounds`. rows_mask [B * H_q]
        bool: only these rows are searched (the others get no pairs).
        """
        b, h_q, d = q.shape
        if b != self.batch or d != self.head_dim or h_q % self.n_kv_heads:
            raise ValueError(f"query shape {tuple(q.shape)} does not fit the index")
        qf = q.detach().float().reshape(b * h_q, d).to(self.device)
        tau_f = tau.detach().float().reshape(-1).to(self.device)
        kv_row = self.kv_row_of(h_q)
        qn = subspace_norms(qf, self.bounds) * (1.0 + self.eps)
        rows_out, keys_out = [], []
        if self.n_indexed:
            top = self._top_level()
            keep = self._dense_bounds(top, qf, qn) >= tau_f[:, None]
            if rows_mask is not None:
                keep &= rows_mask[:, None]
            rows, nodes = keep.nonzero(as_tuple=True)
            for level in range(top - 1, -1, -1):
                m = self.centres[level].shape[1]
                child = (nodes[:, None] * self.fanout + torch.arange(self.fanout, device=self.device)).reshape(-1)
                rows = rows.repeat_interleave(self.fanout)
                if m % self.fanout:  # the last parent has fewer children
                    inside = (child < m).nonzero().squeeze(-1)
                    rows, child = rows.index_select(0, inside), child.index_select(0, inside)
                if rows.numel() > self.dense_fraction * qf.shape[0] * m:
                    # most nodes survive: scoring the whole level by matmul beats gathering them
                    ub = self._dense_bounds(level, qf, qn).view(-1).index_select(0, rows * m + child)
                else:
                    ub = self._bounds(level, qf, qn, rows, kv_row.index_select(0, rows), child, backend)
                keep = (ub >= tau_f.index_select(0, rows)).nonzero().squeeze(-1)
                rows, nodes = rows.index_select(0, keep), child.index_select(0, keep)
            slot = (nodes[:, None] * self.leaf_size + torch.arange(self.leaf_size, device=self.device)).reshape(-1)
            rows = rows.repeat_interleave(self.leaf_size)
            key_ids = self.slots.reshape(-1).index_select(0, kv_row.index_select(0, rows) * self.slots.shape[1] + slot)
            real = (key_ids >= 0).nonzero().squeeze(-1)
            rows_out.append(rows.index_select(0, real))
            keys_out.append(key_ids.index_select(0, real))
        n_pending = self.pending.shape[2]
        if n_pending:
            searched = torch.arange(b * h_q, device=self.device)
            if rows_mask is not None:
                searched = searched[rows_mask]
            rows_out.append(searched.repeat_interleave(n_pending))
            keys_out.append(torch.arange(self.n_indexed, self.n_keys, device=self.device).repeat(searched.numel()))
        if not rows_out:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty
        return torch.cat(rows_out), torch.cat(keys_out)

    def search(self, q: torch.Tensor, tau: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Exactly R(q, tau): bool [B, H_q, N]; keys [B, H_kv, N, D] is the cache that was indexed."""
        b, h_q, _ = q.shape
        rows, ids = self.candidates(q, tau)
        scores = pair_scores(q, keys, rows, ids)
        keep = scores >= tau.detach().float().reshape(-1)[rows]
        mask = torch.zeros(b * h_q, keys.shape[2], dtype=torch.bool, device=keys.device)
        mask[rows[keep], ids[keep]] = True
        return mask.view(b, h_q, -1)

    def memory_bytes(self) -> int:
        """Bytes held by the index (tree + waiting keys), to compare with the KV cache."""
        tensors = self.centres + self.radii + self.counts + [self.slots, self.pending]
        return sum(t.numel() * t.element_size() for t in tensors)


def _finite_or_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, math.inf))


def row_view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View a cache [B, H, N, D] as rows [R, D] plus the row of (b, h, 0): base [B * H].

    Lets gathers use index_select (fast) instead of 3-tensor advanced indexing; works for any
    cache whose last dim is contiguous and whose batch/head strides are whole rows (also a slice of
    a preallocated cache). Falls back to a contiguous copy otherwise.
    """
    b, h, n, d = x.shape
    sb, sh, sn, sd = x.stride()
    if not (sd == 1 or d == 1) or sn == 0 or sb % sn or sh % sn:
        x = x.contiguous()
        sb, sh, sn, sd = x.stride()
    base = (torch.arange(b, device=x.device)[:, None] * (sb // sn) + torch.arange(h, device=x.device) * (sh // sn))
    n_rows = (b - 1) * (sb // sn) + (h - 1) * (sh // sn) + n
    return x.as_strided((n_rows, d), (sn, 1)), base.reshape(-1)


def gather_rows(x: torch.Tensor, n_q_heads: int, rows: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """x[b, h_kv(h), key] for query rows r = b * H_q + h: cache [B, H_kv, N, D] -> [P, D]."""
    flat, base = row_view(x)
    h_kv = x.shape[1]
    kv_row = (rows // n_q_heads) * h_kv + (rows % n_q_heads) // (n_q_heads // h_kv)
    return flat.index_select(0, base.index_select(0, kv_row) + key_ids)


def pair_scores(q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Exact q . k for flat (row, key) pairs: [P] float32, bit-identical to `reference.exact_scores`
    (the same elementwise product summed over the contiguous last dimension).

    q [B, H_q, D], keys [B, H_kv, N, D], rows index b * H_q + h, key_ids index N.
    """
    b, h_q, d = q.shape
    qf = q.detach().float().reshape(b * h_q, d)
    return (qf.index_select(0, rows) * gather_rows(keys, h_q, rows, key_ids).float()).sum(-1)
