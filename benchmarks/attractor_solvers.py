"""Attractor refinement, solver level (issue 5 parts 2-3): plain vs Anderson iterations, training memory
and step time of implicit gradients vs unrolled backprop.

    python3 benchmarks/attractor_solvers.py [--batch 4] [--seq 64] [--dim 128] [--heads 4]
                                            [--gates 4 12 16] [--tol 1.5e-4] [--max-iter 300] [--threads 1]

The map is a random weight-tied attention + MLP block (causal SDPA, LayerNorm, per-channel gates
``gate * U(0, 1)``), ``g(y; c) = h + gm * MLP(LN(h)), h = c + ga * Attn(LN(y + c))``, solved from y0 = c.
Larger gates contract less; each gate's contraction is reported as the measured asymptotic rate of
plain iteration (geometric mean of its last residual ratios per sequence), not assumed. A rate near or
above 1 means the map is not contractive there: plain iteration stalls and only Anderson may converge.

  1. Iterations to ``--tol`` (relative residual ||g(y) - y|| / ||y||, mean over sequences), plain vs
     Anderson (m = 5, beta = 1), and the wall time of each solve.
  2. One training step (forward, loss = mean of y^2, backward) with exactly n = 1, 8, 32 forward
     iterations (tol = 0, min_iter = max_iter; the adjoint still stops at its own tol 1e-5): implicit gradients (Anderson forward, Anderson adjoint)
     vs backprop through n unrolled plain iterations.
     "saved MiB" is the memory autograd holds for backward: the bytes of the distinct storages packed by
     ``torch.autograd.graph.saved_tensors_hooks`` during the forward. It is what grows with iterations;
     it excludes parameters, gradients and transient buffers (the solver's no-grad working set, about
     2 m + 3 copies of y for Anderson, is freed before backward and does not depend on n). CPU has no
     peak-allocation counter in torch, so this is measured instead of a peak.
     Step time is the best of ``--repeats`` runs.
Prints JSON, then tables.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.kernels.fixed_point import FixedPointConfig, fixed_point_solve, solve, unrolled_picard
from graftlm.kernels.fixed_point.memory import autograd_saved_bytes

TRAIN_ITERS = (1, 8, 32)


class TiedBlock(nn.Module):
    """One weight-tied attention + MLP block with per-channel gates; see the module docstring."""

    def __init__(self, dim: int, heads: int, gate: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gate_attn = nn.Parameter(gate * torch.rand(dim))
        self.gate_mlp = nn.Parameter(gate * torch.rand(dim))

    def forward(self, y, c):
        b, t, d = y.shape
        q, k, v = self.qkv(self.ln1(y + c)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = c + self.gate_attn * self.out(attn)
        return h + self.gate_mlp * self.mlp(self.ln2(h))


def best_time(fn, repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls after one warm-up (the slower runs measure the neighbours)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def picard_rate(trace: torch.Tensor, iterations: torch.Tensor, tail: int = 5) -> float:
    """Mean over sequences of the geometric mean of each one's last ``tail`` residual ratios
    r_{k+1} / r_k before it stopped (a frozen sequence's later, constant residuals are left out)."""
    rates = []
    for b, stop in enumerate(iterations.tolist()):
        r = trace[max(0, stop - tail) : stop + 1, b].double().clamp_min(1e-30)
        if len(r) > 1:
            rates.append((r[-1] / r[0]).pow(1.0 / (len(r) - 1)).item())
    return sum(rates) / max(len(rates), 1)


def iterations_to_tolerance(head, c, tol: float, max_iter: int, repeats: int) -> dict:
    f = lambda y: head(y, c)
    row = {}
    with torch.no_grad():
        for method in ("picard", "anderson"):

            def run(method=method):
                return solve(f, c, method, tol=tol, min_iter=0, max_iter=max_iter)

            _, info = run()
            row[method] = {
                "iterations_mean": info.iterations.float().mean().item(),
                "iterations_max": int(info.iterations.max()),
                "converged": int(info.converged.sum()),
                "solve_ms": 1e3 * best_time(run, repeats),
            }
            if method == "picard":
                row["picard_rate"] = picard_rate(info.trace, info.iterations)
    row["speedup"] = row["picard"]["iterations_mean"] / max(row["anderson"]["iterations_mean"], 1.0)
    return row


def training_step(head, c, n: int, backward: str | None):
    """One forward + backward with exactly n forward iterations; ``backward`` is the implicit adjoint
    mode, or None for backprop through n unrolled plain iterations. Returns (step closure, info list)."""
    infos = []

    def step():
        head.zero_grad(set_to_none=True)
        if backward is None:
            y = unrolled_picard(lambda y: head(y, c), c, n)
        else:
            config = FixedPointConfig(solver="anderson", tol=0.0, min_iter=n, max_iter=n, backward=backward)
            y, info = fixed_point_solve(lambda y: head(y, c), c, config)
            infos.append(info)
        y.square().mean().backward()

    return step, infos


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--gates", type=float, nargs="+", default=[4.0, 12.0, 16.0])
    parser.add_argument("--memory-gate", type=float, default=8.0, help="gate of the block in part 2")
    parser.add_argument("--tol", type=float, default=1.5e-4)
    parser.add_argument("--max-iter", type=int, default=300, help="iteration cap of part 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadier than 2 on a shared machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"config": vars(args), "iterations": [], "training": []}
    for gate in args.gates:
        torch.manual_seed(args.seed)
        head = TiedBlock(args.dim, args.heads, gate)
        c = torch.randn(args.batch, args.seq, args.dim)
        results["iterations"].append(
            {"gate": gate, **iterations_to_tolerance(head, c, args.tol, args.max_iter, args.repeats)}
        )

    torch.manual_seed(args.seed)
    head = TiedBlock(args.dim, args.heads, args.memory_gate)
    c = torch.randn(args.batch, args.seq, args.dim, requires_grad=True)
    for backward in ("anderson", "one_step", None):
        for n in TRAIN_ITERS:
            step, infos = training_step(head, c, n, backward)
            row = {
                "method": f"implicit ({backward})" if backward else "unrolled backprop",
                "iterations": n,
                "saved_mib": autograd_saved_bytes(step) / 2**20,
                "step_ms": 1e3 * best_time(step, args.repeats),
            }
            if backward not in (None, "one_step"):
                row["adjoint_iterations_mean"] = infos[-1].adjoint.iterations.float().mean().item()
            results["training"].append(row)
    for row in results["training"]:
        base = next(r for r in results["training"] if r["method"] == row["method"] and r["iterations"] == 1)
        row["saved_ratio_to_1"] = row["saved_mib"] / base["saved_mib"]

    print(json.dumps(results, indent=1))
    print(
        f"\nIterations to tol {args.tol:g} (B={args.batch}, T={args.seq}, D={args.dim}; mean/max over sequences)"
    )
    print(
        f"(conv: sequences of {args.batch} under tol within --max-iter {args.max_iter}; a sequence that did not "
        "converge counts as --max-iter, so speedup is then a lower bound)"
    )
    print(
        f"{'gate':>5} {'picard rate':>11} {'plain iters':>12} {'conv':>5} {'anderson iters':>15} {'conv':>5} "
        f"{'speedup':>8} {'plain ms':>9} {'anderson ms':>12}"
    )
    for r in results["iterations"]:
        p, a = r["picard"], r["anderson"]
        print(
            f"{r['gate']:>5g} {r['picard_rate']:>11.3f} {p['iterations_mean']:>7.1f}/{p['iterations_max']:<4d} "
            f"{p['converged']:>5d} {a['iterations_mean']:>10.1f}/{a['iterations_max']:<4d} {a['converged']:>5d} "
            f"{r['speedup']:>8.2f} {p['solve_ms']:>9.1f} {a['solve_ms']:>12.1f}"
        )
    print(f"\nTraining step, gate {args.memory_gate:g}: autograd-saved memory and time vs forward iterations")
    print(
        f"{'method':<20} {'iters':>5} {'saved MiB':>10} {'ratio to 1':>11} {'step ms':>9} {'adjoint iters':>14}"
    )
    for r in results["training"]:
        adj = f"{r['adjoint_iterations_mean']:.1f}" if "adjoint_iterations_mean" in r else "-"
        print(
            f"{r['method']:<20} {r['iterations']:>5d} {r['saved_mib']:>10.2f} {r['saved_ratio_to_1']:>11.2f} "
            f"{r['step_ms']:>9.1f} {adj:>14}"
        )


if __name__ == "__main__":
    main()
