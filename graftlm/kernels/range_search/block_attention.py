"""Decode attention through a `BlockIndex`: the fast ("block") and certified modes, vectorised PyTorch.

One decode query per sequence. Per kv row g (a kv head of one sequence, read by its group of H_q / H_kv
query heads), every step:

1. The exact part: the tail (cache positions not yet in blocks, always >= the window) and the forced
   blocks (sinks, norm outliers; stored side by side) are scored exactly: a partial softmax and its
   log-mass A_0 per query head.
2. Every other block gets its log-mass estimate from one matmul (`BlockIndex.log_mass_estimates`). With
   Z = exp(A_0) + sum_b exp(est_b) the estimated total, block b's estimated share for head h is
   exp(est_hb) / Z_h. Blocks are ordered by their largest share over the group's heads, and the row reads
   the shortest prefix of that order after which every head's estimated captured share reaches
   ``mass_target`` (issue 19: blocks in order of their estimate until the estimated captured mass reaches
   the target, not a fixed count). Approximate: the estimate is not a bound.
3. Dense fallback: a row whose prefix plus exact part would be more than ``dense_fallback`` of its keys
   is computed densely over every key of the cache, so a head that cannot be pruned costs dense attention
   plus the overhead of steps 1-2. Only the first `capacity` blocks of the order are ever looked at; when
   that capacity is 0 (the exact part alone is over the budget) steps 1-2 are skipped and the step is dense.
   Across steps, `schedule.DenseSchedule` keeps a layer whose plans do not pay off the plan altogether.
4. The chosen blocks of all rows are gathered, scored exactly in one matmul and merged with the exact
   part (online-softmax merge).

Certified mode (``tolerance``): with U = log of the sum over unattended blocks of exp(bound_b) (box bounds,
`BlockIndex.log_mass_bounds`) and A = log of the exact attended mass, the softmax mass left out is at most

    eps = exp(U) / (exp(A) + exp(U))                     (x / (a + x) increases with x)

Blocks are taken in order of their bound. A first prefix is chosen with A estimated, scored exactly, and
extended in a second round, with the now exact A (which can only grow as blocks are added), until
eps <= tolerance for every head; a row that would need more than ``dense_fallback`` of its keys is computed
densely (eps = 0). The output error is then bounded by proof: with o the dense output and o_S the output
over the attended keys, o_S - o = eps' (o_S - o_R) with eps' <= eps, so ||o_S - o|| <= 2 eps max_j ||v_j||.

Host syncs per call: one read of the plan (block counts and dense flags) in the block mode; in the
certified mode one more when some row is neither dense nor done after the first round. No Python loop runs
over keys or blocks (only over the G = B * H_kv rows, to slice each row's prefix).

Shapes: q [B, H_q, D], keys / values [B, H_kv, N, D(_v)] (the cache the index follows), key_mask [B, N]
(True = real) or None. Output [B, H_q, D_v] float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blocks import BlockIndex

NEG_INF = -math.inf
# exp(x - max) is floored at exp(-80) ~ 2e-35 of the row's largest weight: that changes no float32 sum, and it
# keeps exp off float32 denormals, which cost a CPU about 100x more per element (on real attention logits
# most entries lie that far below the max; measured: a 9 x 8192 softmax 470 us with, 79 us without them).
EXP_FLOOR = -80.0


def _finite_max(m: torch.Tensor) -> torch.Tensor:
    """A row max that is safe to subtract: -inf (nothing attended) becomes 0."""
    return m.masked_fill(m == NEG_INF, 0.0)


def shifted_exp(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(logits - m[..., None]) with the exponent floored at EXP_FLOOR; masked (-inf) logits give ~2e-35."""
    return torch.exp((logits - _finite_max(m).unsqueeze(-1)).clamp(min=EXP_FLOOR))


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim via `shifted_exp` (rows with every logit -inf give zeros)."""
    m = logits.amax(-1)
    p = shifted_exp(logits, m).masked_fill((m == NEG_INF).unsqueeze(-1), 0.0)
    return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass
class Partial:
    """An unnormalised softmax over some keys: m [..., H] max logit, l [..., H] sum exp(logit - m),
    o [..., H, D_v] sum exp(logit - m) v."""

    m: torch.Tensor
    l: torch.Tensor
    o: torch.Tensor

    def lse(self) -> torch.Tensor:
        return self.m + self.l.log()

    def output(self) -> torch.Tensor:
        return self.o / self.l.clamp(min=torch.finfo(torch.float32).tiny)[..., None]


def merge_partials(parts: Partial, dim: int) -> Partial:
    """Merge partials stacked along ``dim`` of m / l (and of o): the online-softmax rescaling, summed."""
    m = parts.m.amax(dim)
    w = torch.exp(parts.m - _finite_max(m).unsqueeze(dim))
    return Partial(m, (parts.l * w).sum(dim), (parts.o * w.unsqueeze(-1)).sum(dim))


def softmax_partial(logits: torch.Tensor, values: list[torch.Tensor]) -> Partial:
    """Partial softmax of logits [..., H, K] (-inf = masked) over values given in pieces [..., K_i, D_v]
    (K = sum K_i, in order), without concatenating the values."""
    m = logits.amax(-1)
    p = shifted_exp(logits, m).masked_fill((m == NEG_INF).unsqueeze(-1), 0.0)
    o = None
    for piece, v in zip(p.split([v.shape[-2] for v in values], dim=-1), values):
        if v.shape[-2]:
            term = torch.matmul(piece, v.float())
            o = term if o is None else o + term
    if o is None:
        o = logits.new_zeros(*logits.shape[:-1], values[0].shape[-1])
    return Partial(m, p.sum(-1), o)


@dataclass
class BlockPlan:
    """What one decode step attends, per kv row g: the exact part and the blocks ``order[g, :counts[g]]``,
    or, when ``dense[g]``, every key of the cache. ``bound`` [G, group] is the certified bound on the
    softmax mass left out (certified mode only; 0 on dense rows)."""

    order: torch.Tensor  # [G, <= M] long, blocks in the order they are read
    counts: list[int]
    dense: list[bool]
    bound: torch.Tensor | None = None


def exact_part(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: BlockIndex,
               key_mask: torch.Tensor | None, scale: float) -> Partial:
    """Partial softmax of every row over its tail and forced blocks: m, l [G, group], o [G, group, D_v]."""
    g, _, d = qg.shape
    tail = index.tail_slice()
    kt = keys[:, :, tail].reshape(g, -1, d)
    vt = values[:, :, tail].reshape(g, kt.shape[1], -1)
    lt = scale * torch.matmul(qg, kt.float().transpose(1, 2))
    if key_mask is not None:
        real = key_mask[:, tail].repeat_interleave(index.n_kv_heads, 0)
        lt = lt.masked_fill(~real[:, None, :], NEG_INF)
    if index.exact_keys.shape[1] == 0:
        return softmax_partial(lt, [vt])
    le = scale * torch.matmul(qg, index.exact_keys.float().transpose(1, 2))
    le = le.masked_fill(~index.exact_valid[:, None, :], NEG_INF)
    return softmax_partial(torch.cat([lt, le], -1), [vt, index.exact_values])


def add_blocks(partial: Partial, qg: torch.Tensor, index: BlockIndex, ids: list[torch.Tensor | None],
               scale: float) -> Partial:
    """Merge into ``partial`` the exact softmax of each row over its blocks ``ids[g]`` (None = none).

    The chosen blocks of all rows are gathered at once (row after row) and scored against every row's
    queries in one matmul [G * group, D] x [D, P * bs]; each row keeps its own segment of the keys (with B = 1
    and a few kv heads the wasted products cost less than one small matmul per row).
    """
    g, group, d = qg.shape
    bs, m_blocks = index.block_keys, index.n_blocks
    picked = [(r, r * m_blocks + x) for r, x in enumerate(ids) if x is not None and x.numel()]
    if not picked:
        return partial
    flat = torch.cat([x for _, x in picked])
    kb = index.keys.flatten(0, 1).index_select(0, flat).view(-1, d)
    vb = index.values.flatten(0, 1).index_select(0, flat).view(kb.shape[0], -1)
    ok = index.valid.flatten(0, 1).index_select(0, flat).view(1, -1)  # [1, P * bs]
    logits = scale * torch.matmul(qg.reshape(g * group, d), kb.float().T)  # [G * group, P * bs]
    if g > 1:
        bounds = [0]
        for _, x in picked:
            bounds.append(bounds[-1] + x.numel() * bs)
        start = torch.zeros(g, dtype=torch.long, device=qg.device)
        end = torch.zeros_like(start)
        rows = torch.tensor([r for r, _ in picked], device=qg.device)
        start[rows] = torch.tensor(bounds[:-1], device=qg.device)
        end[rows] = torch.tensor(bounds[1:], device=qg.device)
        key = torch.arange(kb.shape[0], device=qg.device)
        own = (key >= start[:, None]) & (key < end[:, None])  # [G, P * bs]
        ok = (ok & own).repeat_interleave(group, 0)
    logits = logits.masked_fill(~ok, NEG_INF).view(g, group, -1)
    m_new = torch.maximum(partial.m, logits.amax(-1))
    p = shifted_exp(logits, m_new)
    keep = torch.exp(partial.m - _finite_max(m_new))
    l_new = partial.l * keep + p.sum(-1)
    o_new = partial.o * keep[..., None] + torch.matmul(p.view(g * group, -1), vb.float()).view(g, group, -1)
    return Partial(m_new, l_new, o_new)


def dense_rows(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None,
               scale: float, rows: list[int] | None = None) -> torch.Tensor:
    """Dense softmax attention of the given kv rows (all when None) over every cache key: [len, group, D_v].

    A subset is computed row by row on views of the cache (gathering its rows would copy their keys)."""
    b, h, n, d = keys.shape
    k, v = keys.reshape(b * h, n, d), values.reshape(b * h, n, -1)
    real = None if key_mask is None else key_mask.repeat_interleave(h, 0)
    if rows is None or len(rows) == b * h:
        logits = scale * torch.matmul(qg, k.float().transpose(1, 2))
        if real is not None:
            logits = logits.masked_fill(~real[:, None, :], NEG_INF)
        return torch.matmul(softmax(logits), v.float())
    out = []
    for r in rows:
        logits = scale * torch.matmul(qg[r], k[r].float().T)
        if real is not None:
            logits = logits.masked_fill(~real[r], NEG_INF)
        out.append(torch.matmul(softmax(logits), v[r].float()))
    return torch.stack(out)


def capacity(index: BlockIndex, dense_fallback: float) -> int:
    """Blocks a row may read before the dense fallback is cheaper (host arithmetic, no sync)."""
    n_exact = index.n_keys - index.n_blocked + index.exact_keys.shape[1]
    budget = math.floor((dense_fallback * index.n_keys - n_exact) / index.block_keys)
    return max(0, min(index.n_blocks, budget))


def _read_plan(counts: torch.Tensor, dense: torch.Tensor) -> tuple[list[int], list[bool]]:
    """The one host read of a planning round."""
    plan = torch.stack([counts, dense.long()]).tolist()
    return plan[0], [bool(x) for x in plan[1]]


def plan_blocks(qg: torch.Tensor, index: BlockIndex, exact: Partial, *, scale: float, mass_target: float,
                dense_fallback: float) -> BlockPlan:
    """The block mode's choice (module docstring, steps 2-3); one host sync."""
    cap = capacity(index, dense_fallback)
    est = index.log_mass_estimates(qg, scale)  # [G, group, M]
    a0 = exact.lse()
    log_z = torch.logaddexp(a0, torch.logsumexp(est, -1))
    share = shifted_exp(est, log_z)
    top = share.amax(1).topk(cap, dim=-1)  # sorted, the largest first
    order = top.indices
    captured = torch.cat([torch.exp(a0 - log_z)[..., None], share.gather(2, order[:, None, :].expand(
        -1, share.shape[1], -1))], -1).cumsum(-1)  # [G, group, cap + 1] after reading 0..cap blocks
    need = (captured < mass_target).sum(-1).amax(-1)  # cap + 1: not reached within the capacity
    dense = need > torch.minimum(index.selectable, torch.full_like(need, cap))
    return BlockPlan(order, *_read_plan(torch.minimum(need, index.selectable), dense))


def plan_certified(qg: torch.Tensor, index: BlockIndex, exact: Partial, *, scale: float, tolerance: float,
                   dense_fallback: float) -> tuple[BlockPlan, Partial]:
    """The certified mode's choice and the partial over each non-dense row's exact part and chosen blocks
    (module docstring). At most two host syncs."""
    g, group, _ = qg.shape
    cap = capacity(index, dense_fallback)
    ub = index.log_mass_bounds(qg, scale)
    order = ub.amax(1).argsort(-1, descending=True)
    pick = order[:, None, :].expand_as(ub)
    ub_sorted, est_sorted = ub.gather(2, pick), index.log_mass_estimates(qg, scale).gather(2, pick)
    minus_inf = ub.new_full((g, group, 1), NEG_INF)
    # u_after[..., j]: log bound on the unnormalised mass of the blocks order[j:], j = 0..M
    u_after = torch.cat([torch.logcumsumexp(ub_sorted.flip(-1), -1).flip(-1), minus_inf], -1)[..., :cap + 1]
    log_tol = math.log(tolerance)

    def certified_prefix(log_attended: torch.Tensor) -> torch.Tensor:
        """Per row, the shortest prefix (<= cap, else cap + 1) whose bound is <= tolerance for every head."""
        left_out = u_after - torch.logaddexp(log_attended, u_after)
        return (left_out > log_tol).sum(-1).amax(-1)

    a0 = exact.lse()
    estimated = torch.logaddexp(a0[..., None], torch.cat([minus_inf, torch.logcumsumexp(est_sorted, -1)], -1))
    first = certified_prefix(estimated[..., :cap + 1])
    limit = torch.minimum(index.selectable, torch.full_like(first, cap))
    counts1, dense1 = _read_plan(torch.minimum(first, limit), first > limit)
    partial = add_blocks(exact, qg, index, [None if d else order[r, :c] for r, (c, d) in
                                            enumerate(zip(counts1, dense1))], scale)
    counts, dense = counts1, dense1
    if not all(dense1):
        second = torch.maximum(certified_prefix(partial.lse()[..., None]), torch.tensor(counts1, device=qg.device))
        more_dense = (second > limit) | torch.tensor(dense1, device=qg.device)
        counts, dense = _read_plan(torch.minimum(second, limit), more_dense)
        partial = add_blocks(partial, qg, index, [None if d else order[r, c1:c] for r, (c1, c, d) in
                                                  enumerate(zip(counts1, counts, dense))], scale)
    counts_t = torch.tensor(counts, device=qg.device)
    u_final = u_after.gather(2, counts_t[:, None, None].expand(g, group, 1)).squeeze(-1)
    bound = torch.exp(u_final - torch.logaddexp(partial.lse(), u_final))
    bound = bound.masked_fill(torch.tensor(dense, device=qg.device)[:, None], 0.0)
    return BlockPlan(order, counts, dense, bound), partial


def dense_plan(qg: torch.Tensor, mode: str) -> BlockPlan:
    """The plan of a step that reads every key of every row (certified bound 0)."""
    g = qg.shape[0]
    bound = qg.new_zeros(qg.shape[:2]) if mode == "certified" else None
    return BlockPlan(torch.zeros(g, 0, dtype=torch.long, device=qg.device), [0] * g, [True] * g, bound)


def block_sparse_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float | None = None,
    mode: str = "block",
    mass_target: float = 0.99,
    tolerance: float = 0.01,
    dense_fallback: float = 0.5,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockPlan]:
    """Decode attention through the block index (module docstring): (out [B, H_q, D_v] float32, plan).

    ``index`` must have been synced with these keys (`BlockIndex.sync`). mode "block": estimated mass
    target (approximate); "certified": the softmax mass left out is provably <= tolerance per head.
    """
    b, h_q, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if mode not in ("block", "certified"):
        raise ValueError(f"mode must be 'block' or 'certified', not {mode!r}")
    qg = index.group_queries(q)
    if capacity(index, dense_fallback) == 0:  # no block fits the budget: every row is dense, skip the plan
        return dense_rows(qg, keys, values, key_mask, scale).reshape(b, h_q, -1), dense_plan(qg, mode)
    exact = exact_part(qg, keys, values, index, key_mask, scale)
    if mode == "block":
        plan = plan_blocks(qg, index, exact, scale=scale, mass_target=mass_target, dense_fallback=dense_fallback)
        if not all(plan.dense):
            partial = add_blocks(exact, qg, index, [None if d else plan.order[r, :c] for r, (c, d) in
                                                    enumerate(zip(plan.counts, plan.dense))], scale)
    else:
        plan, partial = plan_certified(qg, index, exact, scale=scale, tolerance=tolerance,
                                       dense_fallback=dense_fallback)
    dense = [r for r, is_dense in enumerate(plan.dense) if is_dense]
    if len(dense) == len(plan.dense):
        out = dense_rows(qg, keys, values, key_mask, scale)
    else:
        out = partial.output()
        if dense:
            out = out.index_copy(0, torch.tensor(dense, device=q.device),
                                 dense_rows(qg, keys, values, key_mask, scale, dense))
    return out.reshape(b, h_q, -1), plan


def attended_keys(plan: BlockPlan, index: BlockIndex, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Keys a plan attends, per kv row: bool [G, N] (the tail, the forced blocks, the chosen blocks; every
    real key on a dense row). For measuring recall and for the reference; not on the decode path."""
    g, n = index.batch * index.n_kv_heads, index.n_keys
    out = torch.zeros(g, n, dtype=torch.bool, device=index.device)
    out[:, index.tail_slice()] = True
    for r in range(g):
        ids = torch.cat([index.forced_ids[r][index.forced_valid[r]], plan.order[r, :plan.counts[r]]])
        pos = index.positions[r].index_select(0, ids).reshape(-1)
        out[r, pos[pos >= 0]] = True
        if plan.dense[r]:
            out[r] = True
    if key_mask is not None:
        out &= key_mask.repeat_interleave(index.n_kv_heads, 0)
    return out
