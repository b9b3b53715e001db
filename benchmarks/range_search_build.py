"""What the first range-search decode step pays to build the block index, on real keys (issue 19).

At the first decode step after a prefill, each grafted layer moves every key older than the window into
PCA-ordered blocks (`BlockIndex.sync`, graft defaults of `RangeSearchConfig()` in block mode). This
benchmark times that build on keys captured from the embedded checkpoints over real text
(`range_search_captures.py`), per layer and summed over the captured full-attention layers (for SmolLM2
that is every layer, so the sum is the whole model's first-step index cost), side by side in one run with:

* the PCA ordering on its own, through the equal-segment path the index uses and through the general
  scatter-add path (`_pca_tree_order_segments`, what every build ran before the equal-segment path);
* one dense decode step of the same layers (the grouped matmul the graft falls back to), so that the build
  reads as "decode steps it costs".

Each figure is the median of ``--repeats`` interleaved rounds.

    python3 benchmarks/range_search_build.py                     # SmolLM2 at 7.5k, Gemma 3 at 8k and 32k
    python3 benchmarks/range_search_build.py --models smollm2-135m --lengths 7500 --threads 1
Writes JSON (--json) and a markdown table (--md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from range_search_captures import CAPTURE_TOKENS, load_capture

from graftlm.adapters.range_search import RangeSearchConfig, block_index_options
from graftlm.kernels.range_search import BlockIndex, dense_rows
from graftlm.kernels.range_search.blocks import chunk_sizes
from graftlm.kernels.range_search.index import _pca_tree_order_segments, pca_tree_order

DEFAULT_LENGTHS = {"smollm2-135m": [7500], "gemma-3-270m": [8192, 32768]}


def timed(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def measure(model: str, length: int, repeats: int) -> dict:
    """Median ms over interleaved rounds: the full build, the PCA ordering by both paths, one dense step;
    each summed over the captured layers."""
    data = load_capture(model, CAPTURE_TOKENS[model])
    options = block_index_options(RangeSearchConfig())
    layers = data["layers"]
    caches = {i: (data["keys"][i][:, :, :length].contiguous(), data["values"][i][:, :, :length].contiguous())
              for i in layers}
    b, h, _, d = caches[layers[0]][0].shape
    h_q = data["queries"][layers[0]].shape[1]
    ready = max(0, length - options["window"]) // options["flush_keys"] * options["flush_keys"]
    sizes = chunk_sizes(ready, options["flush_keys"], options["cluster_keys"]) if ready else []

    def chunks(i):
        keys, start = caches[i][0].reshape(b * h, length, d), 0
        for size in sizes:
            yield keys[:, start:start + size]
            start += size

    def build(i):
        BlockIndex(b, h, d, caches[i][1].shape[-1], **options).sync(*caches[i])

    def order_equal(i):
        for chunk in chunks(i):
            pca_tree_order(chunk, options["block_keys"])

    def order_general(i):
        for chunk in chunks(i):
            n = chunk.shape[1]
            _pca_tree_order_segments(chunk, max(1, n // options["block_keys"]), 4)

    def dense_step(i):
        q = data["queries"][i][-1:].reshape(b * h, h_q // h, d)
        dense_rows(q, *caches[i], None, data["scaling"][i])

    parts = {"build": build, "order_equal": order_equal, "order_general": order_general, "dense_step": dense_step}
    for fn in parts.values():  # warm-up
        fn(layers[0])
    rounds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            rounds[name].append(sum(timed(fn, i) for i in layers) * 1e3)
    ms = {name: statistics.median(v) for name, v in rounds.items()}
    return {"model": model, "keys": length, "layers": len(layers), "kv_heads": h, "head_dim": d,
            "chunks": sizes, "ms": ms, "rounds_ms": rounds,
            "build_in_dense_steps": ms["build"] / ms["dense_step"],
            "ordering_speedup": ms["order_general"] / ms["order_equal"]}


def markdown(rows: list[dict], threads: int) -> str:
    stamp = datetime.date.today().isoformat()
    title = (f"Block-index build at the first decode step, summed over the captured layers, {stamp}, torch threads "
             f"{threads}; median of interleaved rounds.")
    lines = [title, "",
             ("| model | keys | layers | build ms | of which PCA order ms | same order, general path ms | order speed-up |"
             " dense step ms (same layers) | build / dense step |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['keys']} | {r['layers']} | {ms['build']:.0f} | {ms['order_equal']:.0f} | "
                     f"{ms['order_general']:.0f} | {r['ordering_speedup']:.2f}x | {ms['dense_step']:.2f} | "
                     f"{r['build_in_dense_steps']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_LENGTHS), choices=list(DEFAULT_LENGTHS))
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="key counts (default per model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        for length in args.lengths or DEFAULT_LENGTHS[model]:
            if length > CAPTURE_TOKENS[model]:
                parser.error(f"{model} keys were captured up to {CAPTURE_TOKENS[model]} tokens, not {length}")
            rows.append(measure(model, length, args.repeats))
            print(f"  {model} {length}: build {rows[-1]['ms']['build']:.0f} ms", file=sys.stderr, flush=True)
    table = markdown(rows, args.threads)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
