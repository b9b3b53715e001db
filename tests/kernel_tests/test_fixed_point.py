"""Fixed-point kernels: Picard/Anderson forward solves, fallback and per-sequence reporting, implicit
gradients against unrolled backprop, constant training memory, Jacobian regulariser."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graftlm.host_syncs import HostSyncCounter
from graftlm.kernels.fixed_point import (
    FixedPointConfig,
    fixed_point_solve,
    solve,
    unrolled_picard,
)
from graftlm.kernels.fixed_point.memory import autograd_saved_bytes

B, T, D = 3, 5, 7  # odd shapes: batch (sequences), positions, channels


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


class TanhMap(nn.Module):
    """y -> tanh(y W^T + c U^T) with spectral norm ||W|| = rho: a contraction with factor <= rho."""

    def __init__(self, dim: int, rho: float):
        super().__init__()
        w = torch.randn(dim, dim)
        self.w = nn.Parameter(rho * w / torch.linalg.matrix_norm(w, 2))
        self.u = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, y, c):
        return torch.tanh(y @ self.w.T + c @ self.u.T)


class TiedBlock(nn.Module):
    """g(y; c) = h + gm * MLP(LN(h)), h = c + ga * Attn(LN(y + c)): one weight-tied attention + MLP block
    (causal, 2 heads) with small per-channel gates, contractive in practice."""

    def __init__(self, dim: int = 10, heads: int = 2, hidden: int = 13, gate: float = 0.3):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gate_attn = nn.Parameter(gate * torch.rand(dim))
        self.gate_mlp = nn.Parameter(gate * torch.rand(dim))

    def forward(self, y, c):
        b, t, d = y.shape
        q, k, v = self.qkv(self.ln1(y + c)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = c + self.gate_attn * self.out(attn)
        return h + self.gate_mlp * self.mlp(self.ln2(h))


def tanh_problem(rho: float = 0.9, scale: float = 0.3):
    head = TanhMap(D, rho)
    c = (scale * torch.randn(B, T, D)).requires_grad_()
    return head, c


def block_problem(gate: float = 3.0):
    head = TiedBlock(gate=gate)
    c = torch.randn(2, 9, 10).requires_grad_()
    return head, c


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("problem", [tanh_problem, block_problem])
def test_anderson_reaches_picard_fixed_point_in_fewer_steps(problem):
    head, c = problem()
    f = lambda y: head(y, c)
    with torch.no_grad():
        y_p, info_p = solve(f, c, "picard", tol=1e-6, max_iter=400)
        y_a, info_a = solve(f, c, "anderson", tol=1e-6, max_iter=400)
    assert info_p.all_converged and info_a.all_converged
    assert not info_p.fallback.any() and not info_a.fallback.any()
    assert (info_a.iterations < info_p.iterations).all(), (info_a.iterations, info_p.iterations)
    assert torch.allclose(y_a, y_p, atol=2e-5, rtol=0)
    assert (info_a.residual < 1e-6).all()
    with torch.no_grad():  # reported residual is the residual of the returned iterate
        r = (f(y_a) - y_a).flatten(1).norm(dim=1) / y_a.flatten(1).norm(dim=1)
    assert torch.allclose(r, info_a.residual, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_min_and_max_iter_respected(method):
    c = torch.randn(B, T, D)
    with torch.no_grad():  # constant map: exact fixed point after one update
        y, info = solve(lambda y: c, torch.zeros_like(c), method, tol=1e-4, min_iter=5, max_iter=9)
    assert info.converged.all() and (info.iterations == 5).all() and info.evaluations == 6
    torch.testing.assert_close(y, c, rtol=0, atol=1e-6)  # Anderson keeps mixing after the exact hit
    head, c = tanh_problem(rho=0.95)
    with torch.no_grad():
        _, info = solve(lambda y: head(y, c), c, method, tol=1e-12, min_iter=0, max_iter=3)
    assert not info.converged.any() and (info.iterations == 3).all() and info.evaluations == 4
    assert not info.fallback.any()  # slow but improving: out of iterations is not a fallback
    with torch.no_grad():
        y0_only, info = solve(lambda y: head(y, c), c, method, max_iter=0)
    assert torch.equal(y0_only, c) and info.evaluations == 1 and (info.iterations == 0).all()


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_per_sequence_reporting_and_freezing(method):
    """Sequence 0 contracts by 0.05, sequence 1 by 0.9 (f(y) = c + s_b W (y - c) + small tanh term)."""
    w = torch.randn(D, D)
    w = w / torch.linalg.matrix_norm(w, 2)
    c = torch.randn(2, T, D)
    s = torch.tensor([0.05, 0.9]).view(2, 1, 1)

    def f(y):
        return c + s * torch.tanh((y - c) @ w.T)

    with torch.no_grad():
        y, info = solve(f, c + 0.5 * torch.randn_like(c), method, tol=1e-6, max_iter=300, check_every=1)
    assert info.converged.all() and not info.fallback.any()
    fast, slow = info.iterations.tolist()
    assert fast < slow and fast <= 8
    assert (info.trace[fast:, 0] == info.trace[fast, 0]).all()  # frozen: its residual stops changing
    assert info.residual[0] == info.trace[fast, 0]
    assert info.trace.shape == (info.evaluations, 2) and info.evaluations == slow + 1
    assert torch.allclose(y, c, atol=1e-5)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_checking_every_few_updates_changes_only_the_evaluation_count(method):
    """Sequences of three speeds, one turning NaN: per-sequence results don't depend on check_every, and
    the solve reads a device value (a host sync) only at k = min_iter, min_iter + check_every, ..."""
    w = torch.randn(D, D)
    w = w / torch.linalg.matrix_norm(w, 2)
    c = torch.randn(4, T, D)
    s = torch.tensor([0.05, 0.5, 0.9, 0.5]).view(4, 1, 1)

    def f(y):
        out = c + s * torch.tanh((y - c) @ w.T)
        return torch.cat([out[:3], out[3:] * torch.where((y[3:] - c[3:]).abs().max() < 1e-3, torch.nan, 1.0)])

    y0 = c + 0.5 * torch.randn_like(c)
    with torch.no_grad():
        y_ref, ref = solve(f, y0, method, tol=1e-6, min_iter=3, max_iter=300, check_every=1)
    assert ref.converged[:3].all() and ref.fallback[3] and len(set(ref.iterations.tolist())) == 4
    for every in (2, 5):
        with torch.no_grad(), HostSyncCounter() as syncs:
            y, info = solve(f, y0, method, tol=1e-6, min_iter=3, max_iter=300, check_every=every)
        assert torch.equal(y, y_ref)
        for name in ("iterations", "residual", "converged", "fallback"):
            assert torch.equal(getattr(info, name), getattr(ref, name)), name
        assert 0 <= info.evaluations - ref.evaluations < every
        assert torch.equal(info.trace[:ref.evaluations], ref.trace)
        checks = range(3, info.evaluations, every)  # k = 3, 3 + every, ... up to the last evaluation
        assert dict(syncs.counts) == {"__bool__": len(checks)}


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_fallback_on_expanding_map(method):
    """f(y) = y + 0.1 + (y - c)^2 / 2 has no fixed point and pushes y away from c. (An affine expanding
    map would not do: Anderson extrapolates to its repelling fixed point.)"""
    c = torch.randn(B, T, D)
    f = lambda y: y + 0.1 + 0.5 * (y - c) ** 2
    with torch.no_grad():
        y, info = solve(f, c, method, tol=1e-6, max_iter=40)
    assert torch.isfinite(y).all() and info.fallback.all() and not info.converged.any()
    best = torch.where(torch.isfinite(info.trace), info.trace, torch.inf).min(0).values
    assert torch.equal(info.residual, best)
    if method == "picard":  # it overflows within 40 steps; its best iterate is the start
        assert torch.equal(y, c) and (info.iterations < 40).all()
    y, info = fixed_point_solve(f, c, FixedPointConfig(solver=method, max_iter=20))
    assert torch.isfinite(y).all() and info.forward.fallback.all()


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_fallback_on_map_that_emits_nan(method):
    """Slow contraction whose values turn NaN for sequence 1 from the 5th evaluation on."""
    head, c = tanh_problem(rho=0.95)
    calls = {"n": 0}

    def f(y):
        calls["n"] += 1
        out = head(y, c)
        if calls["n"] >= 5:
            out = out.clone()
            out[1] = float("nan")
        return out

    with torch.no_grad():
        y, info = solve(f, c, method, tol=1e-6, max_iter=400)
    assert torch.isfinite(y).all()
    assert info.fallback.tolist() == [False, True, False]
    assert info.converged.tolist() == [True, False, True]
    assert info.iterations[1] == 4 and torch.isfinite(info.residual).all()
    assert torch.isinf(info.trace[4:, 1]).all()


def test_nan_from_first_evaluation_returns_y0_flagged():
    y0 = torch.randn(B, T, D)
    with torch.no_grad():
        y, info = solve(lambda y: y * float("nan"), y0, "anderson")
    assert torch.equal(y, y0) and info.fallback.all() and torch.isinf(info.residual).all()
    assert info.evaluations == 1


# --------------------------------------------------------------------------------------------- backward


def reference_grads(head, c, r, n_iter):
    """Gradients of <y, r> by backprop through n_iter plain iterations from y0 = c."""
    y = unrolled_picard(lambda y: head(y, c), c, n_iter)
    return torch.autograd.grad((y * r).sum(), [*head.parameters(), c])


def implicit_grads(head, c, r, config):
    y, info = fixed_point_solve(lambda y: head(y, c), c, config)
    return torch.autograd.grad((y * r).sum(), [*head.parameters(), c]), info


@pytest.mark.parametrize("problem", [tanh_problem, block_problem])
@pytest.mark.parametrize("mode", ["picard", "anderson"])
def test_implicit_gradients_match_unrolled(problem, mode):
    head, c = problem()
    r = torch.randn_like(c)
    want = reference_grads(head, c, r, n_iter=250)
    config = FixedPointConfig(
        tol=1e-6, min_iter=0, max_iter=300, backward=mode, adjoint_tol=1e-6, adjoint_max_iter=300
    )
    got, info = implicit_grads(head, c, r, config)
    assert info.forward.all_converged and info.adjoint is not None and info.adjoint.all_converged
    for g, w in zip(got, want):  # parameters, then the input c
        assert torch.isfinite(g).all()
        assert cosine(g, w) > 0.99


@pytest.mark.parametrize("problem", [tanh_problem, block_problem])
def test_one_step_is_a_correlated_approximation(problem):
    head, c = problem()
    r = torch.randn_like(c)
    want = reference_grads(head, c, r, n_iter=250)
    got, info = implicit_grads(head, c, r, FixedPointConfig(tol=1e-6, max_iter=300, backward="one_step"))
    assert info.adjoint is None
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and cosine(g, w) > 0


@pytest.mark.parametrize(
    "mode, clip, factor",
    [("picard", None, 10.0), ("anderson", None, 10.0), ("one_step", None, 1.9), ("anderson", 2.0, 2.0)],
)
def test_adjoint_modes_and_clip_on_linear_map(mode, clip, factor):
    """f(y) = 0.9 y + c: J = 0.9 I, so dL/dc = u = v / 0.1 exactly, one step gives (1 + 0.9) v, and the
    clip rescales u to clip * ||v|| per sequence."""
    c = torch.randn(B, T, D, requires_grad=True)
    config = FixedPointConfig(
        tol=1e-7, max_iter=300, backward=mode, adjoint_clip=clip, adjoint_tol=1e-7, adjoint_max_iter=400
    )
    y, _ = fixed_point_solve(lambda y: 0.9 * y + c, c, config)
    v = torch.randn_like(c)
    (y * v).sum().backward()
    torch.testing.assert_close(c.grad, factor * v, rtol=1e-4, atol=1e-4)


def test_backward_reaches_parameters_and_inputs_and_reports_adjoint():
    head, c = block_problem()
    y, info = fixed_point_solve(lambda y: head(y, c), c, FixedPointConfig(backward="anderson"))
    assert y.requires_grad and info.adjoint is None
    (y.square().mean()).backward()
    assert info.adjoint is not None and info.adjoint.evaluations >= 1
    assert c.grad is not None and torch.isfinite(c.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    with torch.no_grad():
        y_eval, _ = fixed_point_solve(lambda y: head(y, c), c, FixedPointConfig(backward="anderson"))
    assert not y_eval.requires_grad and torch.equal(y_eval, y.detach())


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_training_memory_does_not_grow_with_iterations(solver):
    head, c = block_problem()

    def implicit(n):
        config = FixedPointConfig(solver=solver, tol=0.0, min_iter=n, max_iter=n, jacobian_samples=1)
        y, info = fixed_point_solve(lambda y: head(y, c), c, config)
        assert info.forward.evaluations == n + 1
        (y.sum() + info.jacobian_loss).backward()

    assert autograd_saved_bytes(lambda: implicit(1)) == autograd_saved_bytes(lambda: implicit(32)) > 0
    unrolled = [
        autograd_saved_bytes(lambda n=n: unrolled_picard(lambda y: head(y, c), c, n).sum().backward()) for n in (1, 4)
    ]
    assert unrolled[1] > 3 * unrolled[0]  # sanity: the counter does see growth


def test_jacobian_regulariser_is_finite_with_gradients():
    head, c = block_problem()
    config = FixedPointConfig(jacobian_samples=2)
    y, info = fixed_point_solve(lambda y: head(y, c), c, config)
    loss = info.jacobian_loss
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    grads = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    y, info = fixed_point_solve(lambda y: head(y, c), c, config)  # as in training: one backward of both
    (y.square().mean() + 1e-3 * info.jacobian_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_jacobian_regulariser_estimates_frobenius_norm():
    """Linear map f(y) = A y + c per position: ||J||_F^2 / N = ||A||_F^2 / D exactly in expectation."""
    a = 0.5 * torch.randn(D, D) / D**0.5
    c = torch.randn(B, T, D)
    _, info = fixed_point_solve(lambda y: y @ a.T + c, c, FixedPointConfig(jacobian_samples=64))
    want = a.square().sum() / D
    assert abs(info.jacobian_loss.item() - want.item()) < 0.15 * want.item()


# ------------------------------------------------------------------------------------ per-position criterion


def slow_position_problem():
    """f(y) = a * y + b per position (y [2, 9, 4]): every position converges in one update except
    position 4 of each sequence, which contracts by 0.5 per update and has a small norm, so on the
    flattened sequence its residual is hidden by the eight large converged positions."""
    rate = torch.zeros(2, 9, 1)
    rate[:, 4] = 0.5
    offset = torch.full((2, 9, 4), 10.0)
    offset[:, 4] = 0.1

    def f(y):
        return rate * y + offset

    return f, torch.zeros(2, 9, 4)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_per_position_criterion_waits_for_the_slowest_position(method):
    f, y0 = slow_position_problem()
    tol = 1e-3
    flat_y, flat = solve(f, y0, method, tol=tol, max_iter=40)
    per_y, per = solve(f, y0, method, tol=tol, max_iter=40, per_position=True)
    position_residual = ((f(flat_y) - flat_y).norm(dim=-1) / flat_y.norm(dim=-1))  # [B, T]
    assert flat.converged.all() and (position_residual[:, 4] > tol).all()  # converged, yet position 4 is not
    assert per.converged.all() and (per.iterations > flat.iterations).all()
    per_position = (f(per_y) - per_y).norm(dim=-1) / per_y.norm(dim=-1)
    assert (per_position < tol).all()
    torch.testing.assert_close(per.residual, per_position.amax(-1))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 4] = False  # position 4 left out (as padding would be): stops as soon as the others have
    _, masked = solve(f, y0, method, tol=tol, max_iter=40, per_position=True, position_mask=mask)
    assert masked.converged.all() and (masked.iterations < per.iterations).all()


def test_per_position_criterion_reaches_the_implicit_solve_and_checks_shapes():
    f, y0 = slow_position_problem()
    config = FixedPointConfig(solver="picard", tol=1e-3, min_iter=0, per_position=True)
    _, info = fixed_point_solve(f, y0, config)
    assert info.forward.converged.all() and (info.forward.iterations >= 8).all()
    with pytest.raises(ValueError, match=r"\[B, T, \.\.\.\]"):
        solve(f, torch.zeros(2, 4), per_position=True)
    with pytest.raises(ValueError, match="position_mask must be"):
        solve(f, y0, per_position=True, position_mask=torch.ones(2, 8, dtype=torch.bool))
