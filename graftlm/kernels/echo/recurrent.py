"""Recurrent (decode) mode of the Echo recall state: a constant-size state updated once per token.

Same function as ``reference.echo_reference`` and ``chunked.echo_chunked`` for the same chunk size L
(see the causality rule in ``reference.py``): the running statistics G, M, C absorb every token, while
the readout operator R = C L^-T A^^K L^-1 that queries use is rebuilt only when a chunk starts (position
% L == 0) and held for the rest of the chunk. With L = 1 it is rebuilt every token and not stored.

State per (batch, head), ``stats_dtype`` floats:

    gram      G  [r, r]   sum z~ z~^T (eps is added at readout)
    lag       M  [r, r]   sum z~_s z~_{s-1}^T
    cross     C  [P, r]   sum v z~^T
    prev_key     [r]      z~ of the last token
    key_norm     []       running max ||z||
    readout   R  [P, r]   operator of the current chunk (only when L > 1)
    gram_carry, lag_carry  [r, r]  Kahan compensation of G and M (only below float64)

so H * (2 r^2 + P r + r + 1) floats per layer and batch row for L = 1 (METHODS.md's count), plus
H * P * r for the held readout when L > 1, plus 2 H r^2 for the compensation in float32, plus one integer
position shared by the batch. Cost per token: O(r^2 + P r) for the update and readout, plus
O(r^3 + K r^3 + P r^2) once per chunk.

Compensated sums (float32 statistics, the dtype policy of ``graftlm.dtype_policy``): adding one
outer product per token to a float32 G loses the low bits of every add, and after thousands of nearly
repeated or low-rank keys the lost bits are far above eps (measured: 0.27 relative readout error after
8k low-rank keys, r = 16), while C's rounding does not matter (1e-6). G and M therefore carry a Kahan
compensation term (two more r x r matrices), which brings float32 decode to the accuracy of one float32
rounding of the float64 statistics (``benchmarks/echo_stats_dtype.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from .reference import DEFAULT_CHUNK, DEFAULT_EPS, DEFAULT_POWER, NORM_FLOOR, per_head, readout_operator


@dataclasses.dataclass(frozen=True)
class EchoState:
    """Streaming Echo state; tensors are [B, H, ...] (see module docstring). Treat as immutable."""

    gram: torch.Tensor
    lag: torch.Tensor
    cross: torch.Tensor
    prev_key: torch.Tensor
    key_norm: torch.Tensor
    readout: torch.Tensor | None
    position: int
    power: int = DEFAULT_POWER
    chunk_size: int = DEFAULT_CHUNK
    eps: float = DEFAULT_EPS
    gram_carry: torch.Tensor | None = None
    lag_carry: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (what ``echo_state_numel`` counts)."""
        held = [self.gram, self.lag, self.cross, self.prev_key, self.key_norm]
        optional = (self.readout, self.gram_carry, self.lag_carry)
        return held + [t for t in optional if t is not None]


def compensated(stats_dtype: torch.dtype) -> bool:
    """Whether statistics of ``stats_dtype`` carry Kahan compensation (every dtype below float64)."""
    return stats_dtype != torch.float64


def echo_state_numel(heads: int, rank: int, value_dim: int, chunk_size: int = DEFAULT_CHUNK,
                     stats_dtype: torch.dtype = torch.float64) -> int:
    """Floats in one batch row's state for one layer: H (2 r^2 + P r + r + 1) [+ H P r when L > 1]
    [+ 2 H r^2 of compensation below float64]."""
    held_readout = value_dim * rank if chunk_size > 1 else 0
    carries = 2 * rank * rank if compensated(stats_dtype) else 0
    return heads * (2 * rank * rank + value_dim * rank + rank + 1 + held_readout + carries)


def accumulate(total: torch.Tensor, carry: torch.Tensor | None, term: torch.Tensor):
    """total + term, Kahan-compensated when ``carry`` is a tensor: returns (new total, new carry)."""
    if carry is None:
        return total + term, None
    corrected = term - carry
    new_total = total + corrected
    return new_total, (new_total - total) - corrected


def init_state(batch: int, heads: int, rank: int, value_dim: int, *, power: int = DEFAULT_POWER,
               chunk_size: int = DEFAULT_CHUNK, eps: float = DEFAULT_EPS,
               stats_dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> EchoState:
    """Empty state (no tokens seen); the first chunk's queries read zero statistics and return y = 0."""
    if chunk_size < 1 or power < 0:
        raise ValueError(f"need chunk_size >= 1 and power >= 0, got {chunk_size}, {power}")
    zeros = lambda *shape: torch.zeros(batch, heads, *shape, dtype=stats_dtype, device=device)
    carry = compensated(stats_dtype)
    return EchoState(gram=zeros(rank, rank), lag=zeros(rank, rank), cross=zeros(value_dim, rank),
                     prev_key=zeros(rank), key_norm=zeros(),
                     readout=zeros(value_dim, rank) if chunk_size > 1 else None,
                     position=0, power=power, chunk_size=chunk_size, eps=eps,
                     gram_carry=zeros(rank, rank) if carry else None, lag_carry=zeros(rank, rank) if carry else None)


def echo_step(state: EchoState, z_t: torch.Tensor, q_t: torch.Tensor, v_t: torch.Tensor,
              gamma: float | torch.Tensor, eta: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, EchoState]:
    """One token: read y_t = eta R q_t, then absorb (z_t, v_t) into the statistics.

    z_t, q_t: [B, H, r]; v_t: [B, H, P]; gamma, eta: scalar or [H].
    Returns (y_t [B, H, P] in q_t's dtype, the state after this token).
    """
    dtype = state.gram.dtype
    readout = state.readout
    if state.readout is None or state.position % state.chunk_size == 0:
        readout = readout_operator(state.gram, state.lag, state.cross, per_head(gamma, 2, state.gram),
                                   state.power, state.eps)
    y_t = per_head(eta, 1, readout) * (readout @ q_t.to(dtype)[..., None])[..., 0]

    z_t, v_t = z_t.to(dtype), v_t.to(dtype)
    key_norm = torch.maximum(state.key_norm, torch.linalg.vector_norm(z_t, dim=-1))
    key = z_t / key_norm.clamp_min(NORM_FLOOR)[..., None]
    gram, gram_carry = accumulate(state.gram, state.gram_carry, key[..., :, None] * key[..., None, :])
    lag, lag_carry = accumulate(state.lag, state.lag_carry, key[..., :, None] * state.prev_key[..., None, :])
    new_state = dataclasses.replace(
        state,
        gram=gram, lag=lag, gram_carry=gram_carry, lag_carry=lag_carry,
        cross=state.cross + v_t[..., :, None] * key[..., None, :],
        prev_key=key, key_norm=key_norm,
        readout=readout if state.chunk_size > 1 else None,
        position=state.position + 1,
    )
    return y_t.to(q_t.dtype), new_state


def echo_recurrent(z: torch.Tensor, q: torch.Tensor, v: torch.Tensor, gamma: float | torch.Tensor,
                   eta: float | torch.Tensor = 1.0, *, power: int = DEFAULT_POWER,
                   chunk_size: int = DEFAULT_CHUNK, eps: float = DEFAULT_EPS,
                   stats_dtype: torch.dtype = torch.float64,
                   state: EchoState | None = None) -> tuple[torch.Tensor, EchoState]:
    """Run ``echo_step`` over a sequence. z, q: [B, H, T, r]; v: [B, H, T, P].

    Starts from ``state`` (its power/chunk_size/eps win) or an empty one. Returns (y [B, H, T, P], state).
    """
    if state is None:
        batch, heads, _, rank = z.shape
        state = init_state(batch, heads, rank, v.shape[-1], power=power, chunk_size=chunk_size, eps=eps,
                           stats_dtype=stats_dtype, device=z.device)
    outputs = []
    for t in range(z.shape[-2]):
        y_t, state = echo_step(state, z[..., t, :], q[..., t, :], v[..., t, :], gamma, eta)
        outputs.append(y_t)
    return torch.stack(outputs, dim=-2), state
