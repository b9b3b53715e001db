"""Can gradient descent teach Echo's projections to recall, and how many steps does it take? (issue 15)

    python3 benchmarks/echo_learn_mqar.py [--steps 1600] [--batch-size 32] [--seeds 0 1 2] [--pairs 16]
                                          [--gap 64] [--out out/echo_learn_mqar]

`echo_capacity.py` shows that a rank-14 Echo state *can* hold 16 pairs when its keys, queries and values are
ideal. The grafts trained on SmolLM2 (RESULTS.md, "Every layer replaced, trained on MQAR alone") still recall
nothing past the window after 48 steps. This benchmark separates the two questions with a toy that mirrors the
graft but costs seconds: **frozen random features, only the mixer trained**, the way a graft sees frozen hidden
states and a frozen LM head.

* Tokens: ``pairs`` key-value pairs ``k_1 v_1 ... k_n v_n`` (keys without replacement from 64 key tokens, values
  from 64 value tokens), ``gap`` filler tokens (16 kinds), then every key once more in a random order, each
  followed by its value; the loss and the accuracy are on the values after the repeated keys (MQAR).
* Features (frozen, random): x_t = E[tok_t] + E_prev[tok_{t-1}] in d = 64, the previous-token part a frozen LM's
  early layers give a graft; logits = (x_t + mixer(x)_t) U^T with U frozen and random.
* Mixers, the only trained parameters, all with H heads, key/query size r, value size P, and the same
  chunk-causal visibility (position t sees the tokens before its chunk, chunk ``--chunk-size``):
  - ``echo``: the graft's own `EchoBranch` (W_q, W_k, W_v, W_o = 0 at init, gamma, eta) through the
    `echo_chunked` kernel at K = 0 (ridge recall, METHODS.md section 3), float32 statistics as the graft;
  - ``echo, W_o random``: the same with W_o initialised like the others (does the zero W_o slow learning?);
  - ``softmax attention``: the same projections read by softmax attention under the same mask, W_o = 0:
    the control that isolates the readout (ridge over running statistics vs attention over every key).

Trained with Adam at ``--lr`` (the graft's 1e-3), accuracy measured on 256 held-out sequences at a ladder of
steps. A query's 95% interval is Wilson over the 256 x ``pairs`` answers (answers of one sequence are not
independent, so the interval is optimistic; the seeds show the spread). Writes ``learn.json`` and
``learn.md`` (a table and a plot ``learn.png``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.adapters.echo import EchoBranch
from graftlm.compare.stats import wilson_interval
from graftlm.kernels.echo import echo_chunked

N_KEYS, N_VALUES, N_FILLER = 64, 64, 16
VOCAB = N_KEYS + N_VALUES + N_FILLER
HELD_OUT = 256  # held-out sequences every accuracy is read on


@dataclass
class Task:
    pairs: int
    gap: int

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T], answer positions bool [B, T]: the positions whose next token is a recalled value)."""
        n = self.pairs
        keys = torch.argsort(torch.rand(batch, N_KEYS, generator=generator), -1)[:, :n]
        values = N_KEYS + torch.randint(0, N_VALUES, (batch, n), generator=generator)
        filler = N_KEYS + N_VALUES + torch.randint(0, N_FILLER, (batch, self.gap), generator=generator)
        order = torch.argsort(torch.rand(batch, n, generator=generator), -1)
        context = torch.stack([keys, values], -1).flatten(1)
        queries = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
        tokens = torch.cat([context, filler, queries], 1)
        answer = torch.zeros_like(tokens, dtype=torch.bool)
        answer[:, 2 * n + self.gap::2] = True  # the repeated keys; their next token is the value
        return tokens, answer


class Features(nn.Module):
    """Frozen random token features and read-out (module docstring)."""

    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        scale = dim ** -0.5
        self.current = nn.Parameter(torch.randn(VOCAB, dim, generator=generator) * scale, requires_grad=False)
        self.previous = nn.Parameter(torch.randn(VOCAB, dim, generator=generator) * scale, requires_grad=False)
        self.unembed = nn.Parameter(torch.randn(VOCAB, dim, generator=generator) * scale, requires_grad=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        prev = F.pad(self.previous[tokens[:, :-1]], (0, 0, 1, 0))
        return self.current[tokens] + prev

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.unembed.T


class EchoMixer(nn.Module):
    """The graft's `EchoBranch` read through `echo_chunked` at K = 0: x [B, T, d] -> [B, T, d]."""

    def __init__(self, dim: int, heads: int, rank: int, value_dim: int, chunk_size: int, zero_output: bool):
        super().__init__()
        self.branch = EchoBranch(dim, heads, rank, value_dim)
        if not zero_output:
            self.branch.w_o.reset_parameters()
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, q, v = self.branch.project(x)
        y = echo_chunked(z, q, v, self.branch.gamma, self.branch.eta, power=0, chunk_size=self.chunk_size,
                         stats_dtype=torch.float32)
        return self.branch.output(y)


class SoftmaxMixer(nn.Module):
    """Softmax attention with the same projections and the same chunk-causal visibility, W_o = 0 at init."""

    def __init__(self, dim: int, heads: int, rank: int, value_dim: int, chunk_size: int):
        super().__init__()
        self.branch = EchoBranch(dim, heads, rank, value_dim)  # only its four projections are used
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, q, v = self.branch.project(x)
        length = x.shape[1]
        pos = torch.arange(length, device=x.device)
        visible = pos[None, :] < self.chunk_size * torch.div(pos[:, None], self.chunk_size, rounding_mode="floor")
        logits = (q @ z.transpose(-1, -2)) * z.shape[-1] ** -0.5
        weights = torch.softmax(logits.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)  # first chunk: none
        return self.branch.output(weights @ v)


SYSTEMS = {
    "echo": lambda a: EchoMixer(a.dim, a.heads, a.rank, a.value_dim, a.chunk_size, zero_output=True),
    "echo, W_o random": lambda a: EchoMixer(a.dim, a.heads, a.rank, a.value_dim, a.chunk_size, zero_output=False),
    "softmax attention": lambda a: SoftmaxMixer(a.dim, a.heads, a.rank, a.value_dim, a.chunk_size),
}


def accuracy(features: Features, mixer: nn.Module, tokens: torch.Tensor, answer: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        x = features.embed(tokens)
        guess = features.logits(x + mixer(x))[:, :-1].argmax(-1)
    hit = (guess == tokens[:, 1:]) & answer[:, :-1]
    return int(hit.sum()), int(answer[:, :-1].sum())


def train_one(system: str, seed: int, args: argparse.Namespace, task: Task, held_out: tuple) -> list[dict]:
    """Train one mixer; its accuracy at every step of ``args.ladder`` (and its final loss)."""
    torch.manual_seed(seed)
    features = Features(args.dim, torch.Generator().manual_seed(args.feature_seed))
    mixer = SYSTEMS[system](args)
    opt = torch.optim.Adam(mixer.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(1000 + seed)
    rows, ladder = [], set(args.ladder)
    for step in range(1, args.steps + 1):
        tokens, answer = task.sample(args.batch_size, data)
        x = features.embed(tokens)
        logits = features.logits(x + mixer(x))[:, :-1]
        loss = F.cross_entropy(logits[answer[:, :-1]], tokens[:, 1:][answer[:, :-1]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in ladder:
            right, total = accuracy(features, mixer, *held_out)
            rows.append({"system": system, "seed": seed, "step": step, "loss": loss.item(), "right": right,
                         "total": total, "accuracy": right / total})
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> str:
    steps = sorted({r["step"] for r in rows})
    lines = [(f"MQAR toy, {args.pairs} pairs, gap {args.gap}, chunk {args.chunk_size}; H = {args.heads}, r = {args.rank}, "
             f"P = {args.value_dim}, d = {args.dim}; batch {args.batch_size}, Adam lr {args.lr}; accuracy on {HELD_OUT} "
             f"held-out sequences (chance 1/{N_VALUES}), mean over seeds {args.seeds} [pooled 95% Wilson], min-max "
             "over seeds"), "",
             "| system | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for system in SYSTEMS:
        cells = []
        for s in steps:
            here = [r for r in rows if r["system"] == system and r["step"] == s]
            if not here:
                cells.append("-")
                continue
            right, total = sum(r["right"] for r in here), sum(r["total"] for r in here)
            lo, hi = wilson_interval(right, total)
            accs = [r["accuracy"] for r in here]
            cells.append(f"{right / total:.3f} [{lo:.3f}, {hi:.3f}] ({min(accs):.2f}-{max(accs):.2f})")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for system in SYSTEMS:
        for seed in sorted({r["seed"] for r in rows}):
            here = sorted((r["step"], r["accuracy"]) for r in rows if r["system"] == system and r["seed"] == seed)
            if here:
                ax.plot(*zip(*here), marker="o", label=system if seed == min(r["seed"] for r in rows) else None,
                        color={"echo": "C0", "echo, W_o random": "C1", "softmax attention": "C2"}[system])
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out recall accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(1 / N_VALUES, color="grey", lw=0.8, ls=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--ladder", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1600])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--gap", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--value-dim", type=int, default=16)
    parser.add_argument("--feature-seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("out/echo_learn_mqar"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if 2 * args.pairs + args.gap < args.chunk_size:
        raise SystemExit(f"--pairs {args.pairs} and --gap {args.gap} fit in one chunk of {args.chunk_size}: "
                         "no query could read a pair")
    args.ladder = sorted(s for s in args.ladder if s <= args.steps) or [args.steps]
    task = Task(args.pairs, args.gap)
    held_out = task.sample(HELD_OUT, torch.Generator().manual_seed(99))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.time()
    for system in args.systems:
        for seed in args.seeds:
            t0 = time.time()
            rows += train_one(system, seed, args, task, held_out)
            print(f"{system}, seed {seed}: accuracy {rows[-1]['accuracy']:.3f} at step {rows[-1]['step']} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    table = report(rows, args)
    (args.out / "learn.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in vars(args).items()},
                                                      "rows": rows, "seconds": time.time() - started}, indent=1))
    (args.out / "learn.md").write_text(table + "\n")
    plot(rows, args.out / "learn.png")
    print(table)


if __name__ == "__main__":
    main()
