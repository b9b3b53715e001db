"""What attention sinks give a window that replaces most of a model's attention (issue 15): forward only.

    python3 benchmarks/echo_sinks.py [--model smollm2-135m] [--keep 7 18 20 23] [--sinks 0 1 4 8]
                                     [--block-length 1024] [--blocks 8] [--window 64] [--out out/echo_sinks]

On held-out real text (the blocks of `benchmarks/echo_layer_choice.py`: licences, "In the Year 2889", the
sources of Python's ``email``, ``http``, ``urllib`` and ``asyncio``), the held-out NLL of the base and of the
model with every candidate layer but ``--keep`` cut to a ``--window``-token window by a fresh replace-mode Echo
graft (W_o = 0, so the window alone), for each sink count in ``--sinks``: the window also attends each row's
first ``s`` tokens (StreamingLLM, arXiv 2309.17453). Candidates: every layer, or with ``--candidates full``
only the full-attention ones (Gemma 3: its 3 global layers). Per variant: mean NLL, the rise over the base with
a 95% bootstrap interval over blocks, and the paired difference to no sinks.

Writes ``sinks_<model>.json`` and ``.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from echo_layer_choice import candidate_layers, evenly_spaced_blocks, replaced_nll

from graftlm.compare.evaluation import block_nll


def bootstrap_mean(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over ``rounds`` resamples."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--keep", type=int, nargs="*", default=[7, 18, 20, 23], help="layers not replaced")
    parser.add_argument("--candidates", default="all", choices=["all", "full"])
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 4, 8])
    parser.add_argument("--block-length", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/echo_sinks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from graftlm.models import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    layers = model.config.num_hidden_layers
    replaced = [i for i in candidate_layers(model, args.candidates) if i not in args.keep]
    blocks = evenly_spaced_blocks(tokenizer, args.block_length, args.blocks)
    base = block_nll(model, blocks)
    rows = []
    for sinks in args.sinks:
        nll = replaced_nll(model, blocks, replaced, args.window, sinks)
        rise = [a - b for a, b in zip(nll, base)]
        rows.append({"sinks": sinks, "nll": sum(nll) / len(nll), "rise": sum(rise) / len(rise),
                     "rise_ci": bootstrap_mean(rise), "block_nll": nll})
        print(f"sinks {sinks}: NLL {rows[-1]['nll']:.4f}, rise {rows[-1]['rise']:+.4f}", flush=True)
    none = rows[0]["block_nll"] if rows[0]["sinks"] == 0 else None
    for row in rows:
        if none is not None and row["sinks"]:
            diff = [a - b for a, b in zip(row["block_nll"], none)]
            row["vs_no_sinks"], row["vs_no_sinks_ci"] = sum(diff) / len(diff), bootstrap_mean(diff)
    report = {"model": args.model, "replaced": replaced, "kept": [i for i in range(layers) if i not in replaced],
              "window": args.window, "blocks": args.blocks, "block_length": args.block_length,
              "base_nll": sum(base) / len(base), "base_block_nll": base, "rows": rows, "threads": args.threads,
              "wall_s": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sinks_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [(f"{args.model}: {len(replaced)} of {layers} layers cut to a {args.window}-token window (kept: "
              f"{report['kept']}), {args.blocks} held-out blocks of {args.block_length} tokens; base NLL "
              f"{report['base_nll']:.4f}."), "",
             "| sink tokens | NLL | rise over base [95% CI] | vs no sinks [95% CI] |", "|---:|---:|---|---|"]
    for row in rows:
        low, high = row["rise_ci"]
        versus = (f"{row['vs_no_sinks']:+.4f} [{row['vs_no_sinks_ci'][0]:+.4f}, {row['vs_no_sinks_ci'][1]:+.4f}]"
                  if "vs_no_sinks" in row else "-")
        lines.append(f"| {row['sinks']} | {row['nll']:.4f} | {row['rise']:+.4f} [{low:+.4f}, {high:+.4f}] | {versus} |")
    lines += ["", f"{args.threads} thread(s), {report['wall_s']:.0f} s."]
    text = "\n".join(lines) + "\n"
    (out / f"sinks_{args.model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
