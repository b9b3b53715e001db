"""Triton kernels for range-search attention: bound scoring and gathered sparse attention.

Two kernels, each checked against the PyTorch reference (also on CPU under TRITON_INTERPRET=1, in
float32; bf16 is broken in the interpreter):

* `pair_bounds`: the subspace upper bound sum_s (q_s . c_s + ||q_s|| rho_s) (paper's bound, see
  `index.py`) for a flat list of (query row, tree node) pairs; the index traversal calls it with
  `backend="triton"`.
* `gathered_attention`: softmax attention of one query row over a padded list of key ids, with the
  halfspace filter q . k >= tau fused in (the first n_forced ids of a row, the sinks and the recent
  window, skip the filter). Online softmax over blocks of ids, one program per query row (flash-
  decoding without the split over N, since the id list is already short). Forward only: it is an
  inference kernel and has no backward; use the reference for gradients.

The fused filter computes q . k with its own summation order, so a key within a float32 ulp of tau
may land on the other side than in the reference; away from that boundary the kept sets agree.
Triton is imported lazily, so this module imports without it; `triton_available()` tells.
"""

from __future__ import annotations

import functools
import math

import torch

from .index import RangeSearchIndex
from .reference import forced_positions


def triton_available() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except (ImportError, RuntimeError):  # pragma: no cover - depends on the environment
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    one_config = [triton.Config({"BLOCK_P": 64}, num_warps=4)]

    @triton.autotune(configs=one_config, key=["D", "S"])
    @triton.jit
    def pair_bounds_kernel(
        q_ptr, qn_ptr, c_ptr, r_ptr, rows_ptr, flat_ptr, out_ptr, P, abs_margin,
        D: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        in_p = offs_p < P
        rows = tl.load(rows_ptr + offs_p, mask=in_p, other=0)
        flat = tl.load(flat_ptr + offs_p, mask=in_p, other=0)
        offs_d = tl.arange(0, BLOCK_D)
        m_pd = in_p[:, None] & (offs_d < D)[None, :]
        qv = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=m_pd, other=0.0)
        cv = tl.load(c_ptr + flat[:, None] * D + offs_d[None, :], mask=m_pd, other=0.0)
        offs_s = tl.arange(0, BLOCK_S)
        m_ps = in_p[:, None] & (offs_s < S)[None, :]
        qn = tl.load(qn_ptr + rows[:, None] * S + offs_s[None, :], mask=m_ps, other=0.0)
        rv = tl.load(r_ptr + flat[:, None] * S + offs_s[None, :], mask=m_ps, other=0.0)
        ub = tl.sum(qv * cv, axis=1) + tl.sum(qn * rv, axis=1) + abs_margin
        finite = tl.abs(ub) < float("inf")  # false for nan and +-inf
        tl.store(out_ptr + offs_p, tl.where(finite, ub, float("inf")), mask=in_p)

    @triton.autotune(configs=[triton.Config({"BLOCK_K": 32}, num_warps=4)], key=["D", "DV"])
    @triton.jit
    def gathered_attention_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, tau_ptr, n_forced_ptr, out_ptr,
        K_MAX, H_Q, GROUP, scale,
        sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        r = tl.program_id(0)
        b = r // H_Q
        h = (r % H_Q) // GROUP
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + r * D + offs_d, mask=offs_d < D, other=0.0)
        tau = tl.load(tau_ptr + r)
        n_forced = tl.load(n_forced_ptr + r)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for start in range(0, K_MAX, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            ids = tl.load(idx_ptr + r * K_MAX + offs, mask=offs < K_MAX, other=-1)
            real = ids >= 0
            safe = tl.where(real, ids, 0)
            k = tl.load(
                k_ptr + b * sk_b + h * sk_h + safe[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=real[:, None] & (offs_d < D)[None, :], other=0.0,
            ).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            keep = real & ((offs < n_forced) | (s >= tau))
            logits = tl.where(keep, s * scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(logits - m_safe)
            v = tl.load(
                v_ptr + b * sv_b + h * sv_h + safe[:, None] * sv_n + offs_dv[None, :] * sv_d,
                mask=keep[:, None] & (offs_dv < DV)[None, :], other=0.0,
            ).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1e-30), 0.0)
        tl.store(out_ptr + r * DV + offs_dv, out, mask=offs_dv < DV)

    return pair_bounds_kernel, gathered_attention_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def pair_bounds(
    q: torch.Tensor,
    qn: torch.Tensor,
    centres: torch.Tensor,
    radii: torch.Tensor,
    rows: torch.Tensor,
    flat_nodes: torch.Tensor,
    abs_margin: float = 0.0,
) -> torch.Tensor:
    """Subspace upper bound for (row, node) pairs: [P] float32, non-finite -> +inf.

    q [R, D] float32, qn [R, S] (inflated ||q_s||), centres [M_all, D], radii [M_all, S] (a level's
    nodes of all kv rows, flattened), rows [P] and flat_nodes [P] int64 index R and M_all.
    """
    pair_bounds_kernel, _ = _kernels()
    p = rows.numel()
    out = torch.empty(p, dtype=torch.float32, device=q.device)
    if p == 0:
        return out
    d, s = q.shape[1], qn.shape[1]

    def grid(meta):
        return (math.ceil(p / meta["BLOCK_P"]),)

    pair_bounds_kernel[grid](
        q.contiguous(), qn.contiguous(), centres.contiguous(), radii.contiguous(),
        rows.contiguous(), flat_nodes.contiguous(), out, p, abs_margin,
        D=d, S=s, BLOCK_D=_pow2(d), BLOCK_S=_pow2(s),
    )
    return out


def gathered_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    idx: torch.Tensor,
    *,
    tau: torch.Tensor | None = None,
    n_forced: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query row over its listed keys, filter q . k >= tau fused in.

    q [B, H_q, D], keys [B, H_kv, N, D], values [B, H_kv, N, D_v], idx [B * H_q, K] int64 key ids
    (-1 = padding), tau [B, H_q] (None = keep all listed), n_forced [B * H_q] (the first n_forced
    ids of a row skip the filter). Returns [B, H_q, D_v] float32; a row that keeps nothing gives 0.
    Forward only.
    """
    _, gathered_attention_kernel = _kernels()
    b, h_q, d = q.shape
    h_kv, d_v = keys.shape[1], values.shape[3]
    n_rows = b * h_q
    tau_rows = (
        torch.full((n_rows,), -math.inf, device=q.device) if tau is None else tau.float().reshape(n_rows)
    )
    forced = torch.zeros(n_rows, dtype=torch.int64, device=q.device) if n_forced is None else n_forced
    out = torch.empty(n_rows, d_v, dtype=torch.float32, device=q.device)
    scale = d**-0.5 if scale is None else scale
    gathered_attention_kernel[(n_rows,)](
        q.float().contiguous(), keys, values, idx.contiguous(), tau_rows.contiguous(),
        forced.to(torch.int64).contiguous(), out,
        idx.shape[1], h_q, h_q // h_kv, scale,
        *keys.stride(), *values.stride(),
        D=d, DV=d_v, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(d_v),
    )
    return out.view(b, h_q, d_v)


def pack_rows(rows: torch.Tensor, key_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Flat (row, key) pairs -> padded ids [n_rows, K_max] (-1 = padding), pairs kept in order."""
    order = torch.argsort(rows, stable=True)
    rows, key_ids = rows[order], key_ids[order]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max().item()) if n_rows and rows.numel() else 0
    idx = torch.full((n_rows, max(width, 1)), -1, dtype=torch.long, device=rows.device)
    idx[rows, torch.arange(rows.numel(), device=rows.device) - starts[rows]] = key_ids
    return idx


def range_search_attention_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: RangeSearchIndex,
    tau: torch.Tensor,
    *,
    n_sink: int = 0,
    n_window: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention through the index with both Triton kernels. Same contract as
    `cpu.range_search_attention_cpu`: q [B, H_q, D], keys/values [B, H_kv, N, D(_v)], tau [B, H_q]
    -> [B, H_q, D_v] float32."""
    b, h_q, _ = q.shape
    n = keys.shape[2]
    n_rows = b * h_q
    forced = forced_positions(n, n_sink, n_window, keys.device)
    rows, ids = index.candidates(q, tau, backend="triton")
    searched = ~forced[ids]
    forced_ids = forced.nonzero().squeeze(-1)
    f_rows = torch.arange(n_rows, device=keys.device).repeat_interleave(forced_ids.numel())
    rows = torch.cat([f_rows, rows[searched]])
    ids = torch.cat([forced_ids.repeat(n_rows), ids[searched]])
    if key_mask is not None:
        ids = torch.where(key_mask[rows // h_q, ids], ids, torch.full_like(ids, -1))
    idx = pack_rows(rows, ids, n_rows)
    n_forced = torch.full((n_rows,), forced_ids.numel(), dtype=torch.int64, device=keys.device)
    return gathered_attention(q, keys, values, idx, tau=tau, n_forced=n_forced, scale=scale)
