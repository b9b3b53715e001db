"""Triton block-sparse decode attention over a `BlockIndex` (issue 19), split over keys, no host sync.

`block_partials` computes, for each kv row g and its group of query heads, the partial softmax over the
blocks ``ids[g, :counts[g]]`` of the block store: a grid of (G, n_splits) programs, program (g, s) walking
the blocks ``ids[g, s * P : min((s + 1) * P, counts[g])]`` (P blocks per split, flash-decoding style) with
an online softmax, writing its (m, l, o); the splits are merged in PyTorch. Scores and the value sum are
``tl.dot`` products of the padded query group [16, D] with a [D, block_keys] key block and of the
probabilities [16, block_keys] with the [block_keys, D_v] value block.

`block_sparse_decode_triton` is the block mode end to end without a host sync: the exact part and the
plan are tensors (`block_attention.exact_part`, the same estimate / order / prefix arithmetic as
`block_attention.plan_blocks`), a dense row reads every selectable block (``BlockIndex.plain_order``),
and nothing is read back to the host. Forward only (decode). Reference: `reference.block_partials_ref`;
tested on CPU under TRITON_INTERPRET=1 in float32 (bf16 is broken in the interpreter).
"""

from __future__ import annotations

import functools
import math

import torch

from .block_attention import BlockPlan, Partial, capacity, exact_part, merge_partials, shifted_exp
from .blocks import BlockIndex

BLOCKS_PER_SPLIT = 16


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def block_decode_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, ids_ptr, counts_ptr, m_ptr, l_ptr, o_ptr,
        M, L, N_SPLITS, PER_SPLIT, scale,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        g = tl.program_id(0)
        s = tl.program_id(1)
        count = tl.load(counts_ptr + g)
        start = s * PER_SPLIT
        end = tl.minimum(start + PER_SPLIT, count)
        offs_h = tl.arange(0, GROUP_P)
        offs_d = tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BS)
        offs_dv = tl.arange(0, BLOCK_DV)
        in_h = offs_h < GROUP
        q = tl.load(q_ptr + (g * GROUP + offs_h)[:, None] * D + offs_d[None, :],
                    mask=in_h[:, None] & (offs_d < D)[None, :], other=0.0)
        m_i = tl.full([GROUP_P], -float("inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, BLOCK_DV], tl.float32)
        for j in range(start, end):
            block = tl.load(ids_ptr + g * L + j)
            row0 = (g * M + block) * BS
            k = tl.load(k_ptr + (row0 + offs_k)[:, None] * D + offs_d[None, :], mask=(offs_d < D)[None, :],
                        other=0.0).to(tl.float32)
            ok = tl.load(valid_ptr + row0 + offs_k) != 0
            logits = tl.dot(q, tl.trans(k)) * scale
            logits = tl.where(ok[None, :], logits, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(logits - m_safe[:, None])
            v = tl.load(v_ptr + (row0 + offs_k)[:, None] * DV + offs_dv[None, :], mask=(offs_dv < DV)[None, :],
                        other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = (g * N_SPLITS + s) * GROUP + offs_h
        tl.store(m_ptr + out, m_i, mask=in_h)
        tl.store(l_ptr + out, l_i, mask=in_h)
        tl.store(o_ptr + out[:, None] * DV + offs_dv[None, :], acc, mask=in_h[:, None] & (offs_dv < DV)[None, :])

    return block_decode_kernel


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def block_partials(qg: torch.Tensor, index: BlockIndex, ids: torch.Tensor, counts: torch.Tensor, scale: float,
                   per_split: int = BLOCKS_PER_SPLIT) -> Partial:
    """Partial softmax of each row's query heads over its blocks ids[g, :counts[g]]: m, l [G, group],
    o [G, group, D_v] float32. qg [G, group, D]; ids [G, L] long (entries past counts[g] are not read);
    counts [G] long (a device tensor: nothing is read back)."""
    g, group, d = qg.shape
    m_blocks, bs, d_v = index.n_blocks, index.block_keys, index.head_dim_v
    n_splits = max(1, math.ceil(ids.shape[1] / per_split))
    m = torch.empty(g, n_splits, group, device=qg.device)
    l_ = torch.empty_like(m)
    o = torch.empty(g, n_splits, group, d_v, device=qg.device)
    _kernel()[(g, n_splits)](
        qg.float().contiguous(), index.keys.contiguous(), index.values.contiguous(),
        index.valid.contiguous().view(torch.uint8), ids.contiguous(), counts.contiguous(), m, l_, o,
        m_blocks, ids.shape[1], n_splits, per_split, scale,
        GROUP=group, GROUP_P=_pow2(group, 16), BS=bs, D=d, BLOCK_D=_pow2(d, 16), DV=d_v, BLOCK_DV=_pow2(d_v, 16),
    )
    return merge_partials(Partial(m, l_, o), dim=1)


def plan_tensors(qg: torch.Tensor, index: BlockIndex, exact: Partial, *, scale: float, mass_target: float,
                 dense_fallback: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block mode's plan without a host read: (ids [G, M], counts [G], dense [G] bool). Same arithmetic
    as `block_attention.plan_blocks`; a dense row reads every selectable block (plain_order)."""
    cap = capacity(index, dense_fallback)
    est = index.log_mass_estimates(qg, scale)
    a0 = exact.lse()
    log_z = torch.logaddexp(a0, torch.logsumexp(est, -1))
    share = shifted_exp(est, log_z)
    order = share.amax(1).topk(cap, dim=-1).indices
    captured = torch.cat([torch.exp(a0 - log_z)[..., None], share.gather(2, order[:, None, :].expand(
        -1, share.shape[1], -1))], -1).cumsum(-1)
    need = (captured < mass_target).sum(-1).amax(-1)
    dense = need > torch.minimum(index.selectable, torch.full_like(need, cap))
    counts = torch.where(dense, index.selectable, torch.minimum(need, index.selectable))
    padded = torch.nn.functional.pad(order, (0, index.n_blocks - cap))
    return torch.where(dense[:, None], index.plain_order, padded), counts, dense


def block_sparse_decode_triton(
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
    """`block_attention.block_sparse_decode` for mode "block" through `block_partials`, with no host sync.

    The plan comes back with tensor ``counts`` and ``dense`` (reading them is the caller's choice). Mode
    "certified" needs its host reads and is routed to the PyTorch path.
    """
    if mode != "block":
        from .block_attention import block_sparse_decode

        return block_sparse_decode(q, keys, values, index, scale=scale, mode=mode, mass_target=mass_target,
                                   tolerance=tolerance, dense_fallback=dense_fallback, key_mask=key_mask)
    b, h_q, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qg = index.group_queries(q)
    exact = exact_part(qg, keys, values, index, key_mask, scale)
    ids, counts, dense = plan_tensors(qg, index, exact, scale=scale, mass_target=mass_target,
                                      dense_fallback=dense_fallback)
    partial = block_partials(qg, index, ids, counts, scale)
    merged = merge_partials(Partial(torch.stack([exact.m, partial.m], 1), torch.stack([exact.l, partial.l], 1),
                                    torch.stack([exact.o, partial.o], 1)), dim=1)
    return merged.output().reshape(b, h_q, -1), BlockPlan(ids, counts, dense)
