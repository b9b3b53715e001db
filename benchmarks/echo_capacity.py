"""How many key-value pairs Echo's ridge readout can hold at rank r (issue 15): the mechanism's ceiling, no model.

    python3 benchmarks/echo_capacity.py [--ranks 8 14 16 32 64] [--pairs 4 8 16 32 64] [--heads 1 9]
                                        [--gaps 0 512] [--trials 200] [--out out/echo_capacity]

Echo at K = 0 answers a query q with ``C (G + eps I)^-1 q`` (METHODS.md section 3: ridge regression over the
keys it has seen), so a head of rank r can return a stored value exactly only while it holds at most r
linearly independent keys. This measures how recall falls off beyond that, under conditions at least as kind
as any trained graft meets:

* per trial, ``n`` pairs (z_i, v_i): each head sees its own key z_i ~ N(0, I_r) (what H heads with independent
  key projections of the same token see at best) and the same value v_i ~ N(0, I_P), P = 64 (SmolLM2's head
  size); then ``gap`` filler tokens with random keys and values (a trained W_k could shrink them; 0 is that
  ideal); then one query per pair, q = z_j exactly (a perfect W_q), which adds nothing to the statistics;
* the readout is the project's `echo_chunked` kernel (K = 0, float64 statistics, eps 1e-3, running-max key
  scaling), with one chunk for the context and one for the queries so every query reads the whole context;
* the H heads' outputs are summed, and a query is right when its nearest stored value (largest dot product
  among the n) is its own v_j: chance is 1 / n.

The accuracy is a ceiling for a rank-r Echo state on MQAR-like recall with that many pairs, not a prediction of
what training reaches. Writes ``capacity.json`` and ``capacity.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from graftlm.compare.stats import wilson_interval
from graftlm.kernels.echo import echo_chunked


def recall_accuracy(rank: int, pairs: int, heads: int, gap: int, trials: int, value_dim: int = 64,
                    seed: int = 0) -> tuple[int, int]:
    """(right answers, queries) over ``trials`` independent contexts (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    context = pairs + gap
    keys = torch.randn(trials, heads, pairs, rank, generator=g, dtype=torch.float64)
    values = torch.randn(trials, 1, pairs, value_dim, generator=g, dtype=torch.float64)
    filler_keys = torch.randn(trials, heads, gap, rank, generator=g, dtype=torch.float64)
    filler_values = torch.randn(trials, 1, gap, value_dim, generator=g, dtype=torch.float64)
    no_key = torch.zeros(trials, heads, pairs, rank, dtype=torch.float64)
    z = torch.cat([keys, filler_keys, no_key], 2)                       # [B, H, context + n, r]
    q = torch.cat([torch.zeros(trials, heads, context, rank, dtype=torch.float64), keys], 2)
    v = torch.cat([values, filler_values, torch.zeros(trials, 1, pairs, value_dim, dtype=torch.float64)], 2)
    y = echo_chunked(z, q, v.expand(-1, heads, -1, -1), 1.0, 1.0, power=0, chunk_size=context)
    read = y[:, :, context:].sum(1)                                     # [B, n, P], summed over heads
    guess = (read @ values[:, 0].transpose(1, 2)).argmax(-1)            # [B, n]
    right = (guess == torch.arange(pairs)).sum().item()
    return int(right), trials * pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 14, 16, 32, 64])
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 9])
    parser.add_argument("--gaps", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/echo_capacity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for gap in args.gaps:
        for heads in args.heads:
            for rank in args.ranks:
                for pairs in args.pairs:
                    right, total = recall_accuracy(rank, pairs, heads, gap, args.trials)
                    rows.append({"gap": gap, "heads": heads, "rank": rank, "pairs": pairs, "right": right,
                                 "queries": total, "accuracy": right / total, "ci": wilson_interval(right, total)})
    report = {"trials": args.trials, "rows": rows, "wall_s": time.perf_counter() - started,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    half_width = max((r["ci"][1] - r["ci"][0]) / 2 for r in rows)
    lines = [(f"Recall accuracy of the K = 0 ridge readout ({args.trials} contexts per cell, one query per pair; "
              f"rows: rank r; columns: pairs stored; 95% Wilson interval half-width <= {half_width:.3f})."), ""]
    for gap in args.gaps:
        for heads in args.heads:
            lines += [f"**{heads} head(s), {gap} filler tokens**", "",
                      "| rank | " + " | ".join(f"{n} pairs" for n in args.pairs) + " |",
                      "|---:|" + "---:|" * len(args.pairs)]
            for rank in args.ranks:
                cells = [r for r in rows if r["gap"] == gap and r["heads"] == heads and r["rank"] == rank]
                lines.append(f"| {rank} | " + " | ".join(f"{r['accuracy']:.3f}" for r in cells) + " |")
            lines.append("")
    lines.append(f"{args.threads} thread(s), {report['wall_s']:.0f} s.")
    text = "\n".join(lines) + "\n"
    (out / "capacity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
