"""Echo recall state, operator level (issue 6 item 6): memory, decode time per token, chunked throughput.

    python3 benchmarks/echo.py [--rank 16] [--chunk-size 64] [--contexts 1024 4096 16384 32768]
                               [--device cpu] [--threads 2] [--sweep-ranks 8 12 14 16] [--memory-only]

For each embedded checkpoint's attention shape (one layer, batch 1, Echo heads = query heads, value
size = head_dim):
  1. state bytes of one Echo layer vs that layer's KV cache (K and V, ``--kv-bytes`` per element) at
     4k, 32k and 131k tokens;
  2. decode time per token: ``echo_step`` on a state prefilled to each context length vs SDPA of one
     query over a KV cache of that length (the attention read only; cache appends are not timed);
  3. ``echo_chunked`` throughput in tokens/s, forward and forward + backward;
  4. ``--sweep-ranks``: the state of one layer at each rank, float32 (with its Kahan compensation terms)
     and float64 statistics, vs that layer's KV cache at 131k tokens (``--memory-only``: only 1 and 4).
The KV column is a full-attention layer's cache; Gemma 3's sliding-window layers (5 of every 6) cap
theirs at the window, so for them the saving applies only beyond it.
Inputs are random: these are operator timings, not a model. Each timing is the best of ``--repeats``
runs (after a warm-up), since on a shared machine the slower runs measure the neighbours. Prints JSON,
then tables.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from graftlm.kernels.echo import echo_chunked, echo_state_numel, echo_step

SHAPES = {  # attention shape per layer of the embedded checkpoints
    "smollm2-135m": {"hidden": 576, "layers": 30, "q_heads": 9, "kv_heads": 3, "head_dim": 64},
    "gemma-3-270m": {"hidden": 640, "layers": 18, "q_heads": 4, "kv_heads": 1, "head_dim": 256},
}
MEMORY_CONTEXTS = (4096, 32768, 131072)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def timed(fn, device: str, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def memory_rows(shape: dict, args) -> list[dict]:
    dtype = DTYPES[args.stats_dtype]
    floats = echo_state_numel(shape["q_heads"], args.rank, shape["head_dim"], args.chunk_size, dtype)
    state_bytes = floats * dtype.itemsize
    rows = []
    for context in MEMORY_CONTEXTS:
        kv_bytes = 2 * shape["kv_heads"] * shape["head_dim"] * context * args.kv_bytes
        rows.append({"context": context, "echo_state_bytes": state_bytes, "kv_cache_bytes": kv_bytes,
                     "kv_over_echo": kv_bytes / state_bytes})
    return rows


def rank_sweep_rows(shape: dict, args) -> list[dict]:
    """One layer's Echo state at each rank of ``--sweep-ranks`` and statistics dtype vs its KV at 131k tokens."""
    kv_bytes = 2 * shape["kv_heads"] * shape["head_dim"] * MEMORY_CONTEXTS[-1] * args.kv_bytes
    rows = []
    for rank in args.sweep_ranks:
        for name, dtype in DTYPES.items():
            floats = echo_state_numel(shape["q_heads"], rank, shape["head_dim"], args.chunk_size, dtype)
            state_bytes = floats * dtype.itemsize
            rows.append({"rank": rank, "stats_dtype": name, "echo_state_bytes": state_bytes,
                         "kv_cache_bytes_131k": kv_bytes, "kv_over_echo": kv_bytes / state_bytes})
    return rows


def random_projections(shape: dict, length: int, args, requires_grad: bool = False):
    heads, dim = shape["q_heads"], shape["head_dim"]
    make = lambda *s: torch.randn(*s, device=args.device, requires_grad=requires_grad)
    return make(1, heads, length, args.rank), make(1, heads, length, args.rank), make(1, heads, length, dim)


def decode_seconds(shape: dict, context: int, args) -> tuple[float, float, int]:
    """Seconds per decoded token at ``context``: (echo_step, SDPA over a KV cache), and the steps timed."""
    heads, kv_heads, dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    gamma = torch.tensor(1.2, device=args.device)
    z, q, v = random_projections(shape, context, args)
    _, state = echo_chunked(z, q, v, gamma, chunk_size=args.chunk_size, stats_dtype=DTYPES[args.stats_dtype],
                            return_state=True)
    z_t, q_t, v_t = z[:, :, -1], q[:, :, -1], v[:, :, -1]
    steps = args.chunk_size * max(1, args.decode_steps // args.chunk_size)  # whole chunks

    def decode_echo():
        current = state
        for _ in range(steps):
            _, current = echo_step(current, z_t, q_t, v_t, gamma)

    query = torch.randn(1, heads, 1, dim, device=args.device)
    keys = torch.randn(1, kv_heads, context, dim, device=args.device)
    values = torch.randn(1, kv_heads, context, dim, device=args.device)

    def decode_attention():
        for _ in range(steps):
            F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

    echo_s = min(timed(decode_echo, args.device, args.repeats)) / steps
    return echo_s, min(timed(decode_attention, args.device, args.repeats)) / steps, steps


@torch.no_grad()
def decode_rows(shape: dict, args) -> list[dict]:
    rows = []
    for context in args.contexts:
        echo_s, sdpa_s, steps = decode_seconds(shape, context, args)
        rows.append({"context": context, "echo_step_us": echo_s * 1e6, "sdpa_decode_us": sdpa_s * 1e6,
                     "steps_timed": steps})
    return rows


def throughput_row(shape: dict, args) -> dict:
    gamma = torch.tensor(1.2, device=args.device, requires_grad=True)
    stats_dtype = DTYPES[args.stats_dtype]
    z, q, v = random_projections(shape, args.throughput_length, args, requires_grad=True)

    def forward():
        with torch.no_grad():
            echo_chunked(z, q, v, gamma, chunk_size=args.chunk_size, stats_dtype=stats_dtype)

    def forward_backward():
        echo_chunked(z, q, v, gamma, chunk_size=args.chunk_size, stats_dtype=stats_dtype).sum().backward()

    tokens = args.throughput_length
    return {"tokens": tokens,
            "forward_tok_s": tokens / min(timed(forward, args.device, args.repeats)),
            "forward_backward_tok_s": tokens / min(timed(forward_backward, args.device, args.repeats))}


def print_tables(report: dict) -> None:
    settings = report["settings"]
    print(f"\nEcho r={settings['rank']}, chunk={settings['chunk_size']}, "
          f"statistics in {settings['stats_dtype']}, "
          f"KV cache at {settings['kv_bytes']} bytes/element, device {settings['device']}, "
          f"{settings['threads']} threads")
    print(f"\n{'model':14s} {'context':>8s} {'Echo state/layer':>17s} {'KV cache/layer':>15s} "
          f"{'KV / Echo':>10s}")
    for name, result in report["models"].items():
        for row in result["memory"]:
            print(f"{name:14s} {row['context']:>8,} {row['echo_state_bytes'] / 1024:>14.1f} KB "
                  f"{row['kv_cache_bytes'] / 2**20:>12.1f} MB {row['kv_over_echo']:>9.0f}x")
    if any("rank_sweep" in r for r in report["models"].values()):
        print(f"\n{'model':14s} {'rank':>5s} {'statistics':>10s} {'Echo state/layer':>17s} {'KV/layer at 131k':>17s} "
              f"{'KV / Echo':>10s}")
        for name, result in report["models"].items():
            for row in result.get("rank_sweep", []):
                print(f"{name:14s} {row['rank']:>5d} {row['stats_dtype']:>10s} "
                      f"{row['echo_state_bytes'] / 1024:>14.1f} KB {row['kv_cache_bytes_131k'] / 2**20:>14.1f} MB "
                      f"{row['kv_over_echo']:>9.0f}x")
    if any("decode" not in r for r in report["models"].values()):
        return
    print(f"\n{'model':14s} {'context':>8s} {'echo_step us/tok':>17s} {'SDPA decode us/tok':>19s}")
    for name, result in report["models"].items():
        for row in result["decode"]:
            print(f"{name:14s} {row['context']:>8,} {row['echo_step_us']:>17.1f} "
                  f"{row['sdpa_decode_us']:>19.1f}")
    print(f"\n{'model':14s} {'tokens':>7s} {'chunked fwd tok/s':>18s} {'fwd+bwd tok/s':>14s}")
    for name, result in report["models"].items():
        row = result["throughput"]
        print(f"{name:14s} {row['tokens']:>7,} {row['forward_tok_s']:>18,.0f} "
              f"{row['forward_backward_tok_s']:>14,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rank", type=int, default=16, help="Echo rank r per head")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--stats-dtype", default="float64", choices=list(DTYPES))
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV-cache element (2 = bf16)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
                        help="context lengths for the decode timing")
    parser.add_argument("--decode-steps", type=int, default=128,
                        help="tokens per decode timing (rounded to whole chunks)")
    parser.add_argument("--throughput-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="timings report the best of these")
    parser.add_argument("--sweep-ranks", type=int, nargs="*", default=[],
                        help="ranks of the state-size table at 131k tokens (float32 and float64 statistics)")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    report = {"settings": {k: getattr(args, k) for k in ("rank", "chunk_size", "stats_dtype", "kv_bytes",
                                                          "device", "threads", "decode_steps", "repeats")},
              "models": {}}
    for name in args.models:
        shape = SHAPES[name]
        result = {"shape": shape, "memory": memory_rows(shape, args)}
        if args.sweep_ranks:
            result["rank_sweep"] = rank_sweep_rows(shape, args)
        if not args.memory_only:
            result.update(decode=decode_rows(shape, args), throughput=throughput_row(shape, args))
        report["models"][name] = result
    print(json.dumps(report, indent=2))
    print_tables(report)


if __name__ == "__main__":
    main()
