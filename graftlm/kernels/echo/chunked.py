"""Chunk-parallel (training / prefill) mode of the Echo recall state, vectorised over chunks.

Same function as ``reference.echo_reference`` (see its causality rule): per chunk c of L tokens, sum the
chunk's outer products (one batched einsum), take exclusive prefix sums over chunks so chunk c sees the
statistics of chunks < c, build every chunk's readout operator with one batched Cholesky, and read all
queries of the chunk through it. Cost O(T (r^2 + P r) + (T / L)(K r^3 + P r^2)); memory holds one
[P, r] operator per chunk.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .recurrent import EchoState, compensated
from .reference import (
    DEFAULT_CHUNK,
    DEFAULT_EPS,
    DEFAULT_POWER,
    per_head,
    previous_keys,
    readout_operator,
    scale_keys,
)


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[i] = sum_{j < i} x[j] along ``dim`` (zero at i = 0), without the cancellation of cumsum - x."""
    summed = torch.cumsum(x.narrow(dim, 0, x.shape[dim] - 1), dim=dim)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), summed], dim=dim)


def echo_chunked(z: torch.Tensor, q: torch.Tensor, v: torch.Tensor, gamma: float | torch.Tensor,
                 eta: float | torch.Tensor = 1.0, *, power: int = DEFAULT_POWER,
                 chunk_size: int = DEFAULT_CHUNK, eps: float = DEFAULT_EPS,
                 stats_dtype: torch.dtype = torch.float64, return_state: bool = False):
    """Echo output for a whole sequence starting from an empty state.

    z, q: [B, H, T, r]; v: [B, H, T, P]; gamma, eta: scalar or [H]; T >= 1. Position t reads the tokens
    s < chunk_size * (t // chunk_size). Returns y [B, H, T, P] in q's dtype, or (y, EchoState) with
    ``return_state``: the state ``echo_step`` continues from, so prefill + decode == one chunked forward.
    """
    batch, heads, length, rank = z.shape
    value_dim = v.shape[-1]
    if length < 1 or chunk_size < 1 or power < 0:
        raise ValueError(f"need T >= 1, chunk_size >= 1, power >= 0; got {length}, {chunk_size}, {power}")
    n_chunks = math.ceil(length / chunk_size)
    pad = n_chunks * chunk_size - length

    keys, key_norms = scale_keys(z.to(stats_dtype))
    keys = F.pad(keys, (0, 0, 0, pad))
    prev = previous_keys(keys)
    values = F.pad(v.to(stats_dtype), (0, 0, 0, pad))
    queries = F.pad(q.to(stats_dtype), (0, 0, 0, pad))

    def by_chunk(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, heads, n_chunks, chunk_size, x.shape[-1])

    keys, prev, values, queries = map(by_chunk, (keys, prev, values, queries))
    gram_chunks = torch.einsum("bhnlr,bhnls->bhnrs", keys, keys)
    lag_chunks = torch.einsum("bhnlr,bhnls->bhnrs", keys, prev)
    cross_chunks = torch.einsum("bhnlp,bhnlr->bhnpr", values, keys)

    gram, lag, cross = (exclusive_cumsum(x, dim=2) for x in (gram_chunks, lag_chunks, cross_chunks))
    readouts = readout_operator(gram, lag, cross, per_head(gamma, 3, gram), power, eps)  # [B, H, N, P, r]
    y = torch.einsum("bhnpr,bhnlr->bhnlp", readouts, queries).reshape(batch, heads, -1, value_dim)
    y = (per_head(eta, 2, y) * y[..., :length, :]).to(q.dtype)
    if not return_state:
        return y

    last = slice(n_chunks - 1, n_chunks)
    current_chunk = length // chunk_size  # the chunk the next token falls in
    held = readouts[:, :, current_chunk] if current_chunk < n_chunks else torch.zeros_like(readouts[:, :, 0])
    state = EchoState(
        gram=(gram[:, :, last] + gram_chunks[:, :, last])[:, :, 0],
        lag=(lag[:, :, last] + lag_chunks[:, :, last])[:, :, 0],
        cross=(cross[:, :, last] + cross_chunks[:, :, last])[:, :, 0],
        prev_key=keys.reshape(batch, heads, -1, rank)[:, :, length - 1],
        key_norm=key_norms[:, :, length - 1],
        readout=held if chunk_size > 1 else None,
        position=length, power=power, chunk_size=chunk_size, eps=eps,
    )
    if compensated(stats_dtype):  # decode continues the sums with Kahan compensation (recurrent.py)
        state = dataclasses.replace(state, gram_carry=torch.zeros_like(state.gram),
                                    lag_carry=torch.zeros_like(state.lag))
    return y, state
