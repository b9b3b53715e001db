"""Kernel-level benchmark of range-search attention (METHODS.md section 4) against dense SDPA.

One run reports side by side, per head shape (SmolLM2-135M, Gemma 3 270M), key kind and context
length: decode attention time per token for torch SDPA and for range search at a few budgets (tau
estimated from a reservoir sample, as at decode time; 4 sink tokens and a 256-key window), the
softmax mass each keeps, the same budget through HNSW (hnswlib, if installed) for recall, index
build and append cost, and index memory as a fraction of the KV cache.

Key kinds: "gaussian" (i.i.d. keys and queries, the worst case for any ball tree: nothing is
close to anything) and "structured" (clustered low-rank keys with a shared offset and noise, and
queries near a stored key, closer to what real attention heads produce). Both are reported.

    python benchmarks/range_search.py                    # 4k and 16k keys, a few minutes on 2 cores
    python benchmarks/range_search.py --full             # 4k, 16k, 64k, 128k
    python benchmarks/range_search.py --device cuda --dtype bfloat16   # SDPA flash vs Triton path
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from graftlm.kernels.range_search import (
    KeyReservoir,
    RangeSearchIndex,
    exact_scores,
    kept_mask,
    range_search_attention_cpu,
    retrieve_pairs,
    softmax_mass_recall,
    threshold_recall,
)

HEAD_SHAPES = {"smollm2-135m": (3, 9, 64), "gemma3-270m": (1, 4, 256)}  # (H_kv, H_q, D)
N_SINK, N_WINDOW = 4, 256


def make_keys(kind: str, n: int, h_kv: int, h_q: int, d: int, n_queries: int, gen: torch.Generator):
    """keys, values [1, H_kv, N, D] and n_queries decode queries [n_queries, 1, H_q, D]."""
    values = torch.randn(1, h_kv, n, d, generator=gen)
    if kind == "gaussian":
        keys = torch.randn(1, h_kv, n, d, generator=gen)
        queries = torch.randn(n_queries, 1, h_q, d, generator=gen)
        return keys, values, queries
    rank, n_clusters = max(2, d // 8), 64
    basis = torch.randn(h_kv, rank, d, generator=gen)
    centres = 2.0 * torch.randn(h_kv, n_clusters, rank, generator=gen)
    coeff = centres[:, torch.randint(0, n_clusters, (n,), generator=gen)] + 0.5 * torch.randn(h_kv, n, rank, generator=gen)
    offset = 2.0 * torch.randn(h_kv, 1, d, generator=gen)
    keys = (coeff @ basis / math.sqrt(rank) + offset + 0.3 * torch.randn(h_kv, n, d, generator=gen)).unsqueeze(0)
    kv_of_head = torch.arange(h_q) // (h_q // h_kv)
    picks = torch.randint(0, n, (n_queries, h_q), generator=gen)
    queries = keys[0, kv_of_head[None, :], picks] + 0.5 * torch.randn(n_queries, h_q, d, generator=gen)
    return keys, values, queries.unsqueeze(1)


def timed_pair(fn_a, fn_b, reps: int, sync) -> tuple[float, float]:
    """Best-of-reps wall time (ms) of two functions, interleaved so both see the same machine load.

    The minimum is reported because on a shared machine the noise is one-sided (other processes
    only ever add time); both methods are measured the same way.
    """
    times_a, times_b = [], []
    fn_a(), fn_b()
    sync()
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return min(times_a), min(times_b)


def sdpa_decode(q, keys, values, device):
    """Dense decode attention with torch SDPA (flash backend on CUDA)."""
    q4 = q.unsqueeze(2)
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)
    return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)


def hnsw_recall(keys, queries, budget, scale, scores_all):
    """Softmax mass and top-m recall of HNSW retrieving the same number of keys as the budget."""
    try:
        import hnswlib
    except ImportError:
        return None
    _, h_kv, n, d = keys.shape
    n_q, _, h_q, _ = queries.shape
    group = h_q // h_kv
    m = max(1, math.ceil(budget * n))
    start = time.perf_counter()
    indexes = []
    for h in range(h_kv):
        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=n, ef_construction=100, M=16, random_seed=0)
        index.add_items(keys[0, h].float().numpy(), num_threads=1)
        index.set_ef(max(m, 64))
        indexes.append(index)
    build_s = time.perf_counter() - start
    mass, topm = [], []
    query_ms = []
    for i in range(n_q):
        retrieved = torch.zeros(1, h_q, n, dtype=torch.bool)
        for h in range(h_q):
            t0 = time.perf_counter()
            labels, _ = indexes[h // group].knn_query(queries[i, 0, h].float().numpy()[None], k=min(m, n), num_threads=1)
            query_ms.append((time.perf_counter() - t0) * 1e3)
            retrieved[0, h, torch.from_numpy(labels[0].astype("int64"))] = True
        scores = scores_all[i]
        mass.append(softmax_mass_recall(scores, retrieved, scale).mean().item())
        top = scores.topk(m, dim=-1).indices
        topm.append(retrieved.gather(-1, top).float().mean().item())
    return {
        "mass_recall": statistics.mean(mass),
        "topm_recall": statistics.mean(topm),
        "build_s": build_s,
        "query_ms_per_token": statistics.mean(query_ms) * h_q,
    }


def bench_case(shape, kind, n, budgets, args, gen):
    h_kv, h_q, d = HEAD_SHAPES[shape]
    device, dtype = args.device, getattr(torch, args.dtype)
    keys, values, queries = make_keys(kind, n, h_kv, h_q, d, args.queries, gen)
    scale = d**-0.5
    scores_all = [exact_scores(queries[i], keys) for i in range(args.queries)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    start = time.perf_counter()
    index = RangeSearchIndex.build(keys.to(device))
    sync()
    build_s = time.perf_counter() - start
    extra = torch.randn(1, h_kv, 256 * args.appends, d, generator=gen)
    grown = RangeSearchIndex.build(keys.to(device))
    start = time.perf_counter()
    for j in range(args.appends):
        grown.append(extra[:, :, 256 * j : 256 * (j + 1)].to(device))
    sync()
    append_ms = (time.perf_counter() - start) * 1e3 / args.appends

    reservoir = KeyReservoir(capacity=args.reservoir, seed=0)
    reservoir.add(keys)
    kd, vd = keys.to(device, dtype), values.to(device, dtype)
    qd = [queries[i].to(device, dtype) for i in range(args.queries)]
    counter = iter(range(10**9))

    def dense_step():
        i = next(counter) % args.queries
        return sdpa_decode(qd[i], kd, vd, device)

    kv_bytes = 2 * keys.numel() * torch.finfo(dtype).bits // 8
    row = {
        "shape": shape, "keys": kind, "n_keys": n, "h_kv": h_kv, "h_q": h_q, "head_dim": d,
        "device": device, "dtype": args.dtype, "build_s": build_s,
        "append_256_ms": append_ms, "index_bytes_over_kv": index.memory_bytes() / kv_bytes, "budgets": [],
    }
    for budget in budgets:
        taus = [reservoir.threshold(queries[i], budget) for i in range(args.queries)]

        def sparse_step(budget=budget):
            i = next(counter) % args.queries
            tau = reservoir.threshold(qd[i], budget)
            if device == "cuda":
                from graftlm.kernels.range_search import range_search_attention_triton

                return range_search_attention_triton(qd[i], kd, vd, index, tau, n_sink=N_SINK, n_window=N_WINDOW)
            return range_search_attention_cpu(qd[i], kd, vd, index, tau, n_sink=N_SINK, n_window=N_WINDOW)

        dense_ms, sparse_ms = timed_pair(dense_step, sparse_step, args.reps, sync)
        mass, exact, kept_frac, cand_frac = [], [], [], []
        for i in range(args.queries):
            scores = scores_all[i]
            rows, ids, _ = retrieve_pairs(queries[i], keys, index, taus[i], n_sink=N_SINK, n_window=N_WINDOW)
            kept = torch.zeros(h_q, n, dtype=torch.bool)
            kept[rows, ids] = True
            kept = kept.unsqueeze(0)
            assert torch.equal(kept, kept_mask(scores, taus[i], N_SINK, N_WINDOW)), "index lost a key"
            mass.append(softmax_mass_recall(scores, kept, scale).mean().item())
            exact.append(threshold_recall(scores, taus[i], kept).mean().item())
            kept_frac.append(kept.float().mean().item())
            cand_rows, _ = index.candidates(queries[i], taus[i])
            cand_frac.append(cand_rows.numel() / (h_q * n))
        entry = {
            "budget": budget, "sdpa_ms": dense_ms, "range_ms": sparse_ms, "speedup_vs_sdpa": dense_ms / sparse_ms,
            "mass_recall": statistics.mean(mass), "threshold_recall": statistics.mean(exact),
            "kept_fraction": statistics.mean(kept_frac), "candidate_fraction": statistics.mean(cand_frac),
        }
        if not args.no_ann:
            entry["hnsw"] = hnsw_recall(keys, queries, budget, scale, scores_all)
        row["budgets"].append(entry)
    return row


def print_table(rows):
    head = (
        f"{'shape':<13}{'keys':<11}{'N':>7}{'budget':>7}{'sdpa ms':>9}{'range ms':>9}{'speedup':>8}"
        f"{'kept':>7}{'cand':>7}{'mass':>7}{'hnsw mass':>10}{'hnsw topm':>10}{'build s':>8}{'app256 ms':>10}{'mem/KV':>7}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        for b in row["budgets"]:
            hnsw = b.get("hnsw")
            hm = f"{hnsw['mass_recall']:.3f}" if hnsw else "n/a"
            ht = f"{hnsw['topm_recall']:.3f}" if hnsw else "n/a"
            print(
                f"{row['shape']:<13}{row['keys']:<11}{row['n_keys']:>7}{b['budget']:>7.3f}{b['sdpa_ms']:>9.3f}"
                f"{b['range_ms']:>9.3f}{b['speedup_vs_sdpa']:>8.2f}{b['kept_fraction']:>7.3f}{b['candidate_fraction']:>7.3f}"
                f"{b['mass_recall']:>7.3f}{hm:>10}{ht:>10}{row['build_s']:>8.2f}{row['append_256_ms']:>10.1f}"
                f"{row['index_bytes_over_kv']:>7.3f}"
            )
    print(
        "kept: fraction of keys attended (retrieved + 4 sinks + 256 window); cand: fraction of keys the "
        "index had to score exactly; mass: softmax mass kept (range search, incl. sinks/window); hnsw: "
        "same number of keys from HNSW (no sinks/window), mass and top-m recall; mem/KV: index bytes / "
        "K+V bytes; times are best of --reps, SDPA and range search interleaved."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--full", action="store_true", help="all of 4k, 16k, 64k and 128k keys")
    parser.add_argument("--shapes", nargs="+", default=sorted(HEAD_SHAPES), choices=sorted(HEAD_SHAPES))
    parser.add_argument("--kinds", nargs="+", default=["gaussian", "structured"], choices=["gaussian", "structured"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--queries", type=int, default=4, help="distinct decode queries per case")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--appends", type=int, default=4, help="256-key blocks appended to time append")
    parser.add_argument("--reservoir", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-ann", action="store_true", help="skip the HNSW comparison")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [4096, 16384, 65536, 131072] if args.full else args.sizes
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        for kind in args.kinds:
            for n in sizes:
                rows.append(bench_case(shape, kind, n, args.budgets, args, gen))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    print(json.dumps(result, indent=1))
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
