"""Plain PyTorch ground truth for range-search attention (METHODS.md section 4).

Paper: "Sparse Attention as a Range Searching Problem: Towards an Inference-Efficient Index for KV
Cache" (arXiv 2605.06763). Decode attention keeps, per head and query, every key in the halfspace

    R(q, tau) = { k : q . k >= tau }                                   (halfspace range query)

plus a few sink tokens and a recent window, and runs an ordinary softmax over what it kept:

    o = sum_{j in R u sink u window} softmax_j(scale * q . k_j) v_j     (masked softmax attention)

Shapes used throughout (decode, one query per sequence, grouped-query attention):
    q       [B, H_q, D]
    keys    [B, H_kv, N, D]     H_q is a multiple of H_kv; q head h reads kv head h // (H_q // H_kv)
    values  [B, H_kv, N, D_v]
    tau     [B, H_q]            raw q . k units (the attention scale is NOT folded in)
    scores  [B, H_q, N]

Everything here is brute force and readable; the fast paths (`index.py`, `cpu.py`,
`triton_kernels.py`) are tested against it.
"""

from __future__ import annotations

import math

import torch

_SCORE_CHUNK = 8192


def expand_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Repeat kv heads for grouped-query attention: [B, H_kv, N, D] -> [B, H_q, N, D]."""
    n_kv = x.shape[1]
    if n_q_heads % n_kv:
        raise ValueError(f"H_q={n_q_heads} is not a multiple of H_kv={n_kv}")
    return x.repeat_interleave(n_q_heads // n_kv, dim=1)


def exact_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The single definition of the score q . k used by every path: [B, H_q, N] in float32.

    Computed as an elementwise product summed over the (contiguous) last dimension, because that
    reduction gives bit-identical results for a key whether it is scored alone or among all N keys
    (a BLAS matmul does not). The fast paths score gathered candidates with the same expression, so
    "retrieved == brute force" can be tested exactly, even when tau equals some key's score.
    """
    b, h_q, d = q.shape
    n_kv = keys.shape[1]
    group = h_q // n_kv
    qf = q.float().reshape(b, n_kv, group, 1, d)
    out = []
    for start in range(0, keys.shape[2], _SCORE_CHUNK):
        kf = keys[:, :, start : start + _SCORE_CHUNK].float().unsqueeze(2)  # [B, H_kv, 1, n, D]
        out.append((qf * kf).sum(-1).reshape(b, h_q, -1))
    if not out:
        return q.new_zeros((b, h_q, 0), dtype=torch.float32)
    return torch.cat(out, dim=-1)


def halfspace_mask(q: torch.Tensor, keys: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Brute-force halfspace retrieval R(q, tau) = {k : q . k >= tau}: bool [B, H_q, N]."""
    return exact_scores(q, keys) >= tau.float().unsqueeze(-1)


def budget_threshold(
    scores: torch.Tensor, budget: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """tau per head and query so that the top ceil(budget * n_valid) scores satisfy s >= tau.

    scores [B, H_q, N], key_mask [B, N] (True = real key) -> tau [B, H_q]. tau is the m-th largest
    valid score, m = max(1, ceil(budget * n_valid)); ties at tau keep a few more keys. budget >= 1
    gives -inf (keep everything); a row without valid keys gets +inf.
    """
    if budget >= 1.0:
        return scores.new_full(scores.shape[:-1], -math.inf)
    s = scores.float()
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, :], -math.inf)
        n_valid = key_mask.sum(-1)[:, None].expand(s.shape[:-1])
    else:
        n_valid = torch.full(s.shape[:-1], s.shape[-1], device=s.device)
    m = torch.clamp(torch.ceil(n_valid.float() * budget).long(), min=1)
    m_max = int(m.max().item()) if m.numel() else 1
    top = s.topk(min(m_max, s.shape[-1]), dim=-1).values
    tau = top.gather(-1, (m.clamp(max=top.shape[-1]) - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(n_valid > 0, tau, torch.full_like(tau, math.inf))


def sample_threshold(q: torch.Tensor, sample_keys: torch.Tensor, budget: float) -> torch.Tensor:
    """tau estimated from a uniform sample of the keys (e.g. a reservoir), per head and query.

    q [B, H_q, D], sample_keys [B, H_kv, m, D] -> tau [B, H_q]: the (1 - budget) quantile of the
    sampled scores, i.e. the value above which a fraction `budget` of all keys is expected to lie.
    """
    if budget >= 1.0 or sample_keys.shape[2] == 0:
        return q.new_full(q.shape[:-1], -math.inf, dtype=torch.float32)
    s = exact_scores(q, sample_keys)
    return torch.quantile(s, 1.0 - budget, dim=-1, interpolation="linear")


def forced_positions(n_keys: int, n_sink: int, n_window: int, device=None) -> torch.Tensor:
    """Keys always attended: the first n_sink (attention sinks) and the last n_window. bool [N]."""
    pos = torch.arange(n_keys, device=device)
    return (pos < n_sink) | (pos >= n_keys - n_window)


def kept_mask(
    scores: torch.Tensor,
    tau: torch.Tensor,
    n_sink: int = 0,
    n_window: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keys attended by range-search attention: R(q, tau) u sink u window, bool [B, H_q, N]."""
    keep = scores >= tau.float().unsqueeze(-1)
    keep = keep | forced_positions(scores.shape[-1], n_sink, n_window, scores.device)
    if key_mask is not None:
        keep = keep & key_mask[:, None, :]
    return keep


def masked_softmax_attention(
    scores: torch.Tensor, keep: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax over the kept keys only, then the weighted sum of values.

    scores [B, H_q, N], keep [B, H_q, N] bool, values [B, H_kv, N, D_v] -> [B, H_q, D_v] float32.
    A row with nothing kept returns zeros.
    """
    logits = (scores.float() * scale).masked_fill(~keep, -math.inf)
    row_max = logits.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    p = torch.exp(logits - row_max)
    denom = p.sum(-1, keepdim=True)
    p = torch.where(denom > 0, p / denom.clamp(min=torch.finfo(torch.float32).tiny), p)
    v = expand_kv(values.float(), scores.shape[1])
    return torch.einsum("bhn,bhnd->bhd", p, v)


def range_search_attention_ref(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tau: torch.Tensor,
    *,
    n_sink: int = 0,
    n_window: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over R(q, tau) u sink u window, brute force. Returns [B, H_q, D_v] float32.

    With tau = -inf this is ordinary dense softmax attention.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = exact_scores(q, keys)
    keep = kept_mask(scores, tau, n_sink, n_window, key_mask)
    return masked_softmax_attention(scores, keep, values, scale)


def softmax_mass_recall(
    scores: torch.Tensor, keep: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of the exact (dense) softmax mass that falls on the kept keys: [B, H_q] in [0, 1].

    scores [B, H_q, N], keep [B, H_q, N] bool.
    """
    logits = scores.float() * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], -math.inf)
    p = torch.softmax(logits, dim=-1)
    return (p * keep).sum(-1)


def threshold_recall(scores: torch.Tensor, tau: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
    """Fraction of the keys with q . k >= tau that were retrieved: [B, H_q] (1 when none qualify).

    scores [B, H_q, N], tau [B, H_q], retrieved [B, H_q, N] bool.
    """
    above = scores >= tau.float().unsqueeze(-1)
    n_above = above.sum(-1)
    hit = (above & retrieved).sum(-1)
    return torch.where(n_above > 0, hit.float() / n_above.clamp(min=1).float(), torch.ones_like(hit, dtype=torch.float32))


def block_partials_ref(qg: torch.Tensor, block_keys: torch.Tensor, block_values: torch.Tensor,
                       valid: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, scale: float):
    """Brute-force partial softmax over listed blocks, the reference of `triton_blocks.block_partials`.

    qg [G, group, D]; block_keys / block_values [G, M, bs, D(_v)]; valid [G, M, bs] bool; ids [G, L] block
    ids of which the first counts[g] are read. Returns (m, l [G, group], o [G, group, D_v]): the max logit,
    sum exp(logit - m) and sum exp(logit - m) v over the valid keys of those blocks (m = -inf, l = 0, o = 0
    for a row that reads nothing).
    """
    g, group, _ = qg.shape
    d_v = block_values.shape[-1]
    m = torch.full((g, group), -math.inf)
    l_ = torch.zeros(g, group)
    o = torch.zeros(g, group, d_v)
    for r in range(g):
        chosen = ids[r, : int(counts[r])]
        keep = valid[r, chosen].reshape(-1)
        k = block_keys[r, chosen].reshape(-1, block_keys.shape[-1])[keep].float()
        v = block_values[r, chosen].reshape(-1, d_v)[keep].float()
        if k.shape[0] == 0:
            continue
        logits = scale * qg[r].float() @ k.T
        m[r] = logits.amax(-1)
        p = torch.exp(logits - m[r][:, None])
        l_[r], o[r] = p.sum(-1), p @ v
    return m, l_, o
