"""Fixed-point layer with implicit gradients in constant memory (METHODS.md section 2, "backward").

For y* = f(y*; theta, c) the implicit function theorem gives, for an incoming gradient v = dL/dy*,

    u = v + J^T u,         J = df/dy at y*                       (adjoint equation)
    dL/dtheta = (df/dtheta)^T u,   dL/dc = (df/dc)^T u            (one VJP of f at y*)

How it is wired (cf. torchdeq's IFT backward; our own code): the forward solve runs under
``torch.no_grad``; then f is applied once with grad to z = y*.detach().requires_grad_(), giving fz with
a graph to theta, c and z. The returned tensor has y*'s values and an ``autograd.Function`` node whose
backward receives v, solves the adjoint with VJPs ``J^T u = autograd.grad(fz, z, u)`` on that one
graph, and hands u to fz's graph, which carries it to theta and c. So the tape holds one evaluation of
f whatever the number of forward iterations. Design choices:

* The output's value is y* itself (the iterate the solver reports a residual for, finite by the
  solver's fallback), not f(y*): training and inference see the same tensor.
* No gradient reaches y0 (y* does not depend on its initial guess); c gets its gradient through f.
* ``loss.backward()`` also accumulates J^T u into the throw-away leaf z (one extra VJP-sized
  product); ``torch.autograd.grad(loss, params)`` prunes it.
* Double backward through the implicit gradient (``create_graph=True``) is not supported.
* f must be deterministic (no dropout) and treat sequences independently; see ``solvers.py``.
* The Jacobian regulariser differentiates a VJP, i.e. needs double backward through f. SDPA's fused
  kernels (CPU flash, GPU flash / memory-efficient) have none, so when it is on the one recorded
  evaluation of f runs under SDPA's math backend (saves the T x T attention weights; still one
  evaluation, independent of the iteration count).
* If f is already non-finite at the returned iterate (only when f(y0) itself is), that sequence's
  gradients are NaN; its forward value is still y0, flagged by ``info.forward.fallback``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from graftlm.dtype_policy import full_precision

from .config import FixedPointConfig
from .solvers import Map, SolveInfo, solve


@dataclass
class FixedPointInfo:
    """forward: the forward solve's report. adjoint: the adjoint solve's report, filled in when the
    backward runs (None before that and for ``backward='one_step'``). jacobian_loss: the scalar
    regulariser of ``jacobian_penalty`` when ``config.jacobian_samples > 0`` and grad is enabled."""

    forward: SolveInfo
    adjoint: SolveInfo | None = None
    jacobian_loss: torch.Tensor | None = None


def fixed_point_solve(
    f: Map, y0: torch.Tensor, config: FixedPointConfig | None = None, position_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, FixedPointInfo]:
    """y* = f(y*) from y0 [B, ...] -> (y* [B, ...], info). Under grad, y* carries implicit gradients
    (adjoint equation above, mode ``config.backward``) to every tensor f uses, e.g.
    ``f = lambda y: head(y, c)`` gives gradients to head's parameters and to c. ``position_mask`` [B, T]:
    positions the forward solve judges when ``config.per_position`` (``solvers.solve``).
    """
    config = config or FixedPointConfig()
    with torch.no_grad():
        y_star, forward_info = solve(
            f,
            y0.detach(),
            config.solver,
            tol=config.tol,
            min_iter=config.min_iter,
            max_iter=config.max_iter,
            m=config.m,
            beta=config.beta,
            lam=config.lam,
            check_every=config.check_every,
            per_position=config.per_position,
            position_mask=position_mask,
        )
    info = FixedPointInfo(forward=forward_info)
    if not torch.is_grad_enabled():
        return y_star, info
    z = y_star.detach().requires_grad_()
    if config.jacobian_samples > 0:
        with sdpa_kernel(
            SDPBackend.MATH
        ):  # the regulariser needs double backward; SDPA's fused kernels lack it
            fz = f(z)
    else:
        fz = f(z)
    if config.jacobian_samples > 0:
        info.jacobian_loss = jacobian_penalty(fz, z, config.jacobian_samples)
    adjoint = _adjoint_solver(fz, z, config, info)
    return _ImplicitGradient.apply(fz, y_star, adjoint), info


def jacobian_penalty(fz: torch.Tensor, z: torch.Tensor, samples: int = 1) -> torch.Tensor:
    """Hutchinson estimate of mean_b ||J_b||_F^2 / N, J_b = d fz[b] / d z[b], N = fz[b].numel():
    the average over ``samples`` draws v ~ N(0, I) of ||J^T v||^2 / N (E ||J^T v||^2 = ||J||_F^2).
    Differentiable (built with create_graph). fz, z [B, ...] -> scalar."""
    total = fz.new_zeros(fz.shape[0], dtype=torch.float32)
    for _ in range(samples):
        v = torch.randn_like(fz)
        (jtv,) = torch.autograd.grad(fz, z, v, create_graph=True, retain_graph=True, materialize_grads=True)
        total = total + jtv.float().pow(2).flatten(1).sum(1)
    return (total / (samples * fz[0].numel())).mean()


def clip_adjoint(u: torch.Tensor, v: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Rescale each sequence of u [B, ...] so that ||u_b|| <= max_ratio * ||v_b||."""
    u_norm = torch.linalg.vector_norm(u.flatten(1).float(), dim=1)
    v_norm = torch.linalg.vector_norm(v.flatten(1).float(), dim=1)
    scale = (max_ratio * v_norm / u_norm.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return u * scale.to(u.dtype).view(-1, *([1] * (u.dim() - 1)))


def _adjoint_solver(
    fz: torch.Tensor, z: torch.Tensor, config: FixedPointConfig, info: FixedPointInfo
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v [B, ...] -> u [B, ...] solving the adjoint equation with VJPs on fz's graph (kept alive)."""

    def vjp(u: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(fz, z, u, retain_graph=True, materialize_grads=True)[0]

    def adjoint(v: torch.Tensor) -> torch.Tensor:
        with full_precision(v.device):  # the backward may run under the caller's autocast
            return _adjoint(v)

    def _adjoint(v: torch.Tensor) -> torch.Tensor:
        if config.backward == "one_step":
            u = v + vjp(v)
        else:
            u, info.adjoint = solve(
                lambda w: v + vjp(w),
                v,
                config.backward,
                tol=config.adjoint_tol,
                min_iter=0,
                max_iter=config.adjoint_max_iter,
                m=config.m,
                beta=config.beta,
                lam=config.lam,
                check_every=config.check_every,
            )
        if config.adjoint_clip is not None:
            u = clip_adjoint(u, v, config.adjoint_clip)
        return u

    return adjoint


class _ImplicitGradient(torch.autograd.Function):
    """Forward: y* (values), attached to fz's graph. Backward: v -> adjoint(v), passed on to fz."""

    @staticmethod
    def forward(ctx, fz, y_star, adjoint):
        ctx.adjoint = adjoint
        return y_star

    @staticmethod
    def backward(ctx, v):
        return ctx.adjoint(v), None, None
