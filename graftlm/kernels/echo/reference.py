"""Plain PyTorch ground truth for the Echo recall state (METHODS.md section 3).

Paper: "Echo: KV-Cache-Free Associative Recall with Spectral Koopman Operators" (arXiv 2605.06997).
Per head, with rank r and value size P, the inputs are already projected:

    z [B, H, T, r]   keys        q [B, H, T, r]   queries        v [B, H, T, P]   values

and everything below is per (batch, head). The operator is

    z~_t = z_t / max(n_t, floor),  n_t = max_{s <= t} ||z_s||         key scaling ("running max norm")
    G = sum_s z~_s z~_s^T                                              running statistics, z~_{-1} = 0
    M = sum_s z~_s z~_{s-1}^T                                          (lag-1)
    C = sum_s v_s z~_s^T
    G + eps I = L L^T                                                  Cholesky
    A = L^-1 M L^-T,  A^ = gamma A / max(sigma_max(A), 1)              spectral normalisation,
                                                                       gamma clamped to [1, 1.5]
    y = eta C (G + eps I)^-1 L A^^K L^-1 q = eta C L^-T A^^K L^-1 q    readout

which is eta C G^-1 (M G^-1)^K q (with G + eps I for G) whenever the normalisation is inactive.
K = 0 is plain ridge-regression recall ``eta C (G + eps I)^-1 q``.

Decisions (shared by every path in this package)
-------------------------------------------------
* Causality, the one meaning of both modes: with chunk size L, the query at position t reads the
  statistics of exactly the tokens s < L * floor(t / L), i.e. of all earlier chunks and nothing from its
  own chunk (METHODS.md: "chunk-causal, exclusive prefix sums"). The lag pair (s - 1, s) belongs to the
  later token s, so M holds only pairs whose both tokens are visible. With L = 1 this is token-level
  streaming that reads tokens strictly before t: excluding t itself is what keeps the ridge readout
  from answering every query with its own value (C G^-1 z_t ~ v_t when q_t ~ z_t), and it is the L = 1
  case of the chunked rule, so one definition covers training and decode. The recurrent mode
  (`recurrent.py`) takes the same L: statistics are accumulated every token but the readout operator a
  query uses is refreshed only at chunk boundaries, so prefill-then-decode equals the full chunked
  forward exactly. The first chunk reads empty statistics and returns y = 0 (with K >= 1, also
  until a lag pair is visible).
* Key scaling lives inside the operator, because the running max n_t is streaming state (the "+1" of the
  state count). It is causal per token (n_t includes z_t, never later keys), independent of chunking,
  and makes the operator invariant to rescaling the keys (z -> c z, c > 0), so eps is relative to unit-
  norm keys. Queries are not scaled (METHODS.md scales z only); W_q learns the query scale.
* Numerics: statistics and the r x r solves are kept in ``stats_dtype``. Token-by-token float32 sums of
  nearly repeated unit keys (r = 16) were measured off by ~4e-3 in spectral norm after 4k tokens and
  ~0.5 after 131k, above eps = 1e-3, so G + eps I could turn indefinite and the whitening amplifies the
  error by 1/eps. Below float64 the decode sums of G and M are therefore Kahan-compensated
  (``recurrent.py``), and a matrix that rounding left indefinite is factored with a small jitter
  (`ridge_cholesky`); ``benchmarks/echo_stats_dtype.py`` measures float32 against float64 on real
  hidden states. Outputs are cast back to the dtype of q.
* gamma and eta are scalars or per-head tensors [H]; gamma's clamp passes no gradient outside [1, 1.5].

This file is brute force and readable: ``echo_reference`` rebuilds the statistics from scratch for every
position. ``chunked.py`` (training) and ``recurrent.py`` (decode) are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAMMA_MIN, GAMMA_MAX = 1.0, 1.5
DEFAULT_EPS = 1e-3
DEFAULT_POWER = 2
DEFAULT_CHUNK = 64
NORM_FLOOR = 1e-6


def per_head(value: float | torch.Tensor, trailing_dims: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-head [H] parameter shaped to broadcast over [B, H, *trailing] tensors like ``like``."""
    value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    value = value.to(dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * trailing_dims))


def scale_keys(z: torch.Tensor, floor: float = NORM_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Running-max-norm key scaling z~_t = z_t / max(n_t, floor), n_t = max_{s<=t} ||z_s||.

    z: [B, H, T, r] -> (z~ [B, H, T, r], n [B, H, T]).
    """
    running = torch.cummax(torch.linalg.vector_norm(z, dim=-1), dim=-1).values
    return z / running.clamp_min(floor).unsqueeze(-1), running


def previous_keys(z_scaled: torch.Tensor) -> torch.Tensor:
    """z~_{t-1} at every position t, zero at t = 0: [B, H, T, r] -> [B, H, T, r]."""
    return F.pad(z_scaled, (0, 0, 1, 0))[..., :-1, :]


def ridge_cholesky(gram: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Lower-triangular L with G + eps I = L L^T. gram: [..., r, r] -> [..., r, r].

    G is a sum of outer products, so G + eps I is positive definite, but rounding (long float32 sums of
    nearly repeated keys) can leave a matrix indefinite. Such a matrix is factored with a jitter of
    ``sqrt(unit roundoff) * mean diagonal`` added to eps instead (the rounding error is far below that),
    chosen per matrix on the device: no host sync (``torch.linalg.cholesky`` would read its error flag
    on the host, and raise).
    """
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    ridged = gram + eps * eye
    with torch.no_grad():
        _, info = torch.linalg.cholesky_ex(ridged)
        jitter = torch.finfo(gram.dtype).eps ** 0.5 * gram.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
        jitter = torch.where(info == 0, torch.zeros_like(jitter), jitter)
    return torch.linalg.cholesky_ex(ridged + jitter[..., None, None] * eye)[0]


def whitened_operator(gram: torch.Tensor, lag: torch.Tensor, gamma: torch.Tensor, eps: float = DEFAULT_EPS):
    """Cholesky factor and spectrally normalised whitened lag operator.

    G + eps I = L L^T,  A = L^-1 M L^-T,  A^ = clamp(gamma, 1, 1.5) A / max(sigma_max(A), 1).
    gram, lag: [..., r, r]; gamma broadcastable to [..., r, r] (see ``per_head``).
    Returns (L [..., r, r] lower triangular, A^ [..., r, r]); ||A^||_2 <= clamp(gamma, 1, 1.5).
    """
    chol = ridge_cholesky(gram, eps)
    half = torch.linalg.solve_triangular(chol, lag, upper=False)  # L^-1 M
    whitened = torch.linalg.solve_triangular(chol, half.mT, upper=False).mT  # (L^-1 M) L^-T
    sigma = torch.linalg.matrix_norm(whitened, ord=2)[..., None, None]
    gamma = gamma.clamp(GAMMA_MIN, GAMMA_MAX)
    return chol, gamma * whitened / sigma.clamp_min(1.0)


def readout_operator(gram: torch.Tensor, lag: torch.Tensor, cross: torch.Tensor, gamma: torch.Tensor,
                     power: int = DEFAULT_POWER, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The linear map a query is read through: R = C L^-T A^^K L^-1, so y = eta R q.

    Equals C (G + eps I)^-1 (M (G + eps I)^-1)^K when sigma_max(A) <= 1 and gamma = 1, since
    (M G^-1)^K = L A^K L^-1 for G = L L^T. K = ``power`` = 0 is ridge recall C (G + eps I)^-1.
    gram, lag: [..., r, r] (G without eps, M); cross: [..., P, r] (C); gamma broadcastable to [..., r, r].
    Returns R [..., P, r].
    """
    if power == 0:
        chol = ridge_cholesky(gram, eps)
    else:
        chol, operator = whitened_operator(gram, lag, gamma, eps)
    readout = torch.linalg.solve_triangular(chol, cross.mT, upper=False).mT  # C L^-T
    for _ in range(power):
        readout = readout @ operator
    return torch.linalg.solve_triangular(chol, readout, upper=False, left=False)  # (.) L^-1


def echo_reference(z: torch.Tensor, q: torch.Tensor, v: torch.Tensor, gamma: float | torch.Tensor,
                   eta: float | torch.Tensor = 1.0, *, power: int = DEFAULT_POWER,
                   chunk_size: int = DEFAULT_CHUNK, eps: float = DEFAULT_EPS,
                   stats_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Echo output by brute force: every position rebuilds G, M, C from the tokens it may read.

    z, q: [B, H, T, r]; v: [B, H, T, P]; gamma, eta: scalar or [H]. Position t reads tokens
    s < chunk_size * (t // chunk_size) (module docstring). Returns y [B, H, T, P] in q's dtype.
    """
    keys, _ = scale_keys(z.to(stats_dtype))
    prev = previous_keys(keys)
    queries, values = q.to(stats_dtype), v.to(stats_dtype)
    gamma = per_head(gamma, 2, keys)
    outputs = []
    for t in range(z.shape[-2]):
        visible = chunk_size * (t // chunk_size)
        seen = keys[..., :visible, :]
        gram = seen.mT @ seen
        lag = seen.mT @ prev[..., :visible, :]
        cross = values[..., :visible, :].mT @ seen
        readout = readout_operator(gram, lag, cross, gamma, power, eps)
        outputs.append(readout @ queries[..., t, :, None])
    y = torch.cat(outputs, dim=-1).mT  # [B, H, T, P]
    return (per_head(eta, 2, y) * y).to(q.dtype)
