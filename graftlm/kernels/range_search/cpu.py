"""Fast CPU path: decode attention through the index, in vectorised PyTorch.

Same result as `reference.range_search_attention_ref` (the retrieved set is bit-identical because
candidates are scored with the same expression; the softmax differs only by summation order).
Work is proportional to the nodes visited and the keys retrieved, not to N, apart from the dense
scoring of the index's first level (<= start_nodes nodes per head).

The softmax runs over ragged (row, key) pairs: row-wise max by scatter, exp, and index_add of the
weighted values, so no [B, H_q, N] tensor is ever built.
"""

from __future__ import annotations

import math

import torch

from .block_attention import EXP_FLOOR
from .index import RangeSearchIndex, gather_rows, pair_scores
from .reference import forced_positions


def retrieve_pairs(
    q: torch.Tensor,
    keys: torch.Tensor,
    index: RangeSearchIndex,
    tau: torch.Tensor,
    *,
    n_sink: int = 0,
    n_window: int = 0,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys attended by each query row: R(q, tau) u sink u window, as flat pairs with their scores.

    q [B, H_q, D], keys [B, H_kv, N, D], tau [B, H_q], key_mask [B, N] (True = real key) ->
    (rows [P], key_ids [P], scores [P]) with row = b * H_q + h and scores the exact q . k.
    """
    b, h_q, _ = q.shape
    n = keys.shape[2]
    if index.n_keys != n:
        raise ValueError(f"index holds {index.n_keys} keys but the cache has {n}")
    forced = forced_positions(n, n_sink, n_window, keys.device)
    rows, ids = index.candidates(q, tau)
    scores = pair_scores(q, keys, rows, ids)
    hit = (scores >= tau.detach().float().reshape(-1).index_select(0, rows)) & ~forced.index_select(0, ids)
    hit = hit.nonzero().squeeze(-1)
    forced_ids = forced.nonzero().squeeze(-1)
    f_rows = torch.arange(b * h_q, device=keys.device).repeat_interleave(forced_ids.numel())
    f_ids = forced_ids.repeat(b * h_q)
    rows = torch.cat([rows.index_select(0, hit), f_rows])
    ids = torch.cat([ids.index_select(0, hit), f_ids])
    scores = torch.cat([scores.index_select(0, hit), pair_scores(q, keys, f_rows, f_ids)])
    if key_mask is not None:
        real = key_mask[rows // h_q, ids]
        rows, ids, scores = rows[real], ids[real], scores[real]
    return rows, ids, scores


def ragged_softmax_attention(
    rows: torch.Tensor,
    key_ids: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    n_q_heads: int,
    scale: float,
) -> torch.Tensor:
    """softmax_j(scale * s_j) v_j over each row's pairs: values [B, H_kv, N, D_v] -> [B * H_q, D_v].

    A row without pairs gives zeros.
    """
    b, _, _, d_v = values.shape
    n_rows = b * n_q_heads
    logits = scores * scale
    row_max = torch.full((n_rows,), -math.inf, device=values.device)
    row_max.scatter_reduce_(0, rows, logits, reduce="amax")
    weights = torch.exp((logits - row_max[rows]).clamp(min=EXP_FLOOR))  # floor: see block_attention.EXP_FLOOR
    denom = torch.zeros(n_rows, device=values.device).index_add_(0, rows, weights)
    v = gather_rows(values, n_q_heads, rows, key_ids).float()
    out = torch.zeros(n_rows, d_v, device=values.device).index_add_(0, rows, weights[:, None] * v)
    return out / denom.clamp(min=torch.finfo(torch.float32).tiny)[:, None]


def range_search_attention_cpu(
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
    """Decode attention over R(q, tau) u sink u window through the index. Returns [B, H_q, D_v].

    q [B, H_q, D], keys/values [B, H_kv, N, D(_v)] (the cache the index was built on), tau [B, H_q]
    in raw q . k units, key_mask [B, N] optional (True = real key). Output dtype float32.
    """
    b, h_q, d = q.shape
    scale = d**-0.5 if scale is None else scale
    rows, ids, scores = retrieve_pairs(
        q, keys, index, tau, n_sink=n_sink, n_window=n_window, key_mask=key_mask
    )
    return ragged_softmax_attention(rows, ids, scores, values, h_q, scale).view(b, h_q, -1)
