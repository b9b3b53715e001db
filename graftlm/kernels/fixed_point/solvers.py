"""Forward solvers for y* = f(y*) on a batch of sequences (METHODS.md section 2, "forward solve").

Shapes: y0 [B, ...]; f maps [B, ...] to [B, ...] and treats the B sequences independently (attention
within a sequence is fine, mixing across sequences is not: convergence is judged per sequence).

Decisions
---------
* Stopping rule, per sequence b, on the flattened state:

      r_k[b] = ||f(y_k)[b] - y_k[b]|| / ||y_k[b]||      (0 when the numerator is 0)

  i.e. METHODS.md's ``||y_{k+1} - y_k|| / ||y_k||`` for plain iteration, where y_{k+1} = f(y_k). For
  Anderson y_{k+1} != f(y_k), and r_k is still the fixed-point residual of the iterate y_k, so both
  solvers are judged by the same number. A sequence stops when r_k < tol and k >= min_iter; every
  sequence stops at k = max_iter.
* Per position (``per_position=True``, y0 [B, T, ...]): r_k[b] is instead the largest residual over the
  sequence's positions t, ``max_t ||f(y_k)[b, t] - y_k[b, t]|| / ||y_k[b, t]||`` (positions where
  ``position_mask`` [B, T] is False, e.g. padding, left out). On the flattened state a few unconverged
  tokens hide among many converged ones (the norm is dominated by the many); with the max, a sequence
  counts as converged only when every position has. The Anderson mixing is unchanged (per sequence).
* k counts updates: y_0 is the initial guess, y_k the state after k updates. Judging y_k costs one map
  evaluation, so a solve uses at most max_iter + 1 evaluations (``SolveInfo.evaluations``), and
  ``max_iter=0`` only measures the residual of y0.
* Per-sequence freezing: a sequence that stopped keeps its state while the others iterate; f still runs
  on the whole batch (the closure may hold per-batch context), and the frozen rows are discarded.
* Host syncs: whether every sequence has stopped is a device value, and reading it stalls a GPU. The
  loop reads it only at k = min_iter, min_iter + check_every, ... (and ends at max_iter), so a solve
  makes about (iterations - min_iter) / check_every + 1 host syncs. Between checks a batch whose
  sequences have all stopped runs a few more evaluations on frozen rows; they change nothing, so every
  per-sequence result (state, iterations, residual, converged, fallback) is the same for any
  check_every, and only ``evaluations`` and the length of ``trace`` grow (by < check_every).
* Safe fallback: every sequence returns its lowest-residual iterate among those with a finite residual
  (a converged sequence returns the iterate that met the tolerance). A sequence whose map value turns
  non-finite stops at once. ``fallback`` flags a sequence that did not converge and returns an earlier
  iterate than its last one, or met a non-finite value; a slowly converging sequence that simply ran
  out of iterations has ``converged=False, fallback=False``. Given a finite y0 the result is finite
  (rows of y0 that are not finite are returned unchanged and flagged).
* Precision: the state, the Anderson history and the residuals live in float32 (or float64 when y0 is
  float64); f sees its input in y0's dtype. With a bfloat16 map, r cannot fall much below bfloat16's
  resolution (~4e-3), so a tolerance such as 1.5e-4 is then met only by exact fixed points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .anderson import AndersonHistory

SOLVERS = ("picard", "anderson")

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveInfo:
    """Per-sequence report of one solve (all tensors [B], on y0's device).

    iterations: updates the sequence ran before it stopped (<= max_iter; >= min_iter when converged).
    residual:   relative residual r of the returned iterate (float32; inf when none was finite).
    converged:  r < tol was reached with at least min_iter updates.
    fallback:   not converged and the returned iterate is an earlier best one, or a non-finite value
                appeared (see the module docstring).
    evaluations: map evaluations of the whole batch (an int).
    trace:      [evaluations, B] residual of the state at each evaluation (a frozen sequence repeats its
                value; inf where the map value was non-finite).
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    fallback: torch.Tensor
    evaluations: int
    trace: torch.Tensor

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def relative_residual(
    y: torch.Tensor, fy: torch.Tensor, positions: int | None = None, position_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """r = ||fy - y|| / ||y|| per row of y, fy [B, N]; 0 where fy == y, inf where not finite. -> [B].

    ``positions`` = T: each row is T positions of N / T numbers; r is then the largest per-position
    residual of the row, over the positions where ``position_mask`` [B, T] is True (all when None)."""
    if positions is not None:
        y, fy = y.view(y.shape[0], positions, -1), fy.view(fy.shape[0], positions, -1)
    diff = torch.linalg.vector_norm(fy - y, dim=-1).float()
    norm = torch.linalg.vector_norm(y, dim=-1).float().clamp_min(torch.finfo(torch.float32).tiny)
    r = torch.where(diff == 0, torch.zeros_like(diff), diff / norm)
    r = torch.nan_to_num(r, nan=float("inf"))
    if positions is None:
        return r
    if position_mask is not None:
        r = torch.where(position_mask.bool(), r, torch.zeros_like(r))
    return r.amax(-1)


def solve(
    f: Map,
    y0: torch.Tensor,
    method: str = "anderson",
    *,
    tol: float = 1.5e-4,
    min_iter: int = 0,
    max_iter: int = 32,
    m: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    check_every: int = 4,
    per_position: bool = False,
    position_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve y = f(y) from y0 [B, ...] by plain (Picard) iteration y_{k+1} = f(y_k) or Anderson
    acceleration (``anderson.py``; memory m, mixing beta, ridge lam). Returns (y*, info) with y* shaped
    and typed like y0, detached from any graph only if the caller runs it under ``torch.no_grad``.
    Stopping, freezing, fallback and the host syncs (one per ``check_every`` updates) are described in
    the module docstring; ``per_position`` (y0 [B, T, ...]) judges each sequence by its worst position,
    leaving out those where ``position_mask`` [B, T] is False.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; expected one of {SOLVERS}")
    if not 0 <= min_iter <= max_iter:
        raise ValueError(f"need 0 <= min_iter <= max_iter, got {min_iter}, {max_iter}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    shape, dtype, batch = y0.shape, y0.dtype, y0.shape[0]
    positions = None
    if per_position:
        if y0.dim() < 3:
            raise ValueError(f"per_position needs y0 shaped [B, T, ...], got {tuple(shape)}")
        positions = shape[1]
        if position_mask is not None and tuple(position_mask.shape) != tuple(shape[:2]):
            raise ValueError(f"position_mask must be [B, T] = {tuple(shape[:2])}, got {tuple(position_mask.shape)}")
    elif position_mask is not None:
        raise ValueError("position_mask is only used with per_position=True")
    work = torch.promote_types(dtype, torch.float32)
    y = y0.reshape(batch, -1).to(work)

    def map_flat(state: torch.Tensor) -> torch.Tensor:
        return f(state.view(shape).to(dtype)).reshape(batch, -1).to(work)

    start_ok = torch.isfinite(y).all(-1)
    active = start_ok.clone()
    converged = torch.zeros_like(active)
    nonfinite = ~start_ok
    iterations = torch.zeros(batch, dtype=torch.long, device=y.device)
    best_y, best_r = y.clone(), torch.full((batch,), float("inf"), device=y.device)
    best_k = torch.zeros_like(iterations)
    history = AndersonHistory(batch, y.shape[1], m, work, y.device) if method == "anderson" else None
    trace = []

    for k in range(max_iter + 1):
        iterations = torch.where(active, k, iterations)
        fy = map_flat(y)
        r = relative_residual(y, fy, positions, position_mask)
        trace.append(r)
        finite = torch.isfinite(r)
        done = active & finite & (r < tol) & (k >= min_iter)
        take = done | (active & finite & (r < best_r))
        best_y = torch.where(take[:, None], y, best_y)
        best_r = torch.where(take, r, best_r)
        best_k = torch.where(take, k, best_k)
        converged |= done
        nonfinite |= active & ~finite
        active &= finite & ~done
        if k == max_iter or (k >= min_iter and (k - min_iter) % check_every == 0 and not active.any()):
            break
        fy = torch.where(finite[:, None], fy, y)
        if history is None:
            y_next = fy
        else:
            history.push(y, fy)
            y_next = history.mix(beta, lam)
            y_next = torch.where(torch.isfinite(y_next).all(-1, keepdim=True), y_next, fy)
        y = torch.where(active[:, None], y_next, y)

    fallback = ~converged & ((best_k != iterations) | nonfinite)
    info = SolveInfo(
        iterations=iterations,
        residual=best_r,
        converged=converged,
        fallback=fallback,
        evaluations=len(trace),
        trace=torch.stack(trace),
    )
    return best_y.view(shape).to(dtype), info
