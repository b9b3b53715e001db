"""Range-search attention on real keys (METHODS.md section 4; issue 19): every mode against dense, one run.

Keys, values and decode queries are captured from the embedded checkpoints over long real text
(`range_search_captures.py`: licences and Python sources; SmolLM2-135M up to 8k tokens, Gemma 3 270M up to
32k; regenerated and cached under ~/.cache/graftlm/captures when absent). At each length L, the decode
queries at positions L - 1 - 64 j (j < 8) attend their causal prefix; the indexes follow the cache as at
decode time (built at the first query, then synced key by key, flushing blocks as keys leave the window).

Per mode and length, over every captured full-attention layer, query and head:

* keys read: the fraction of the keys a kv head reads (exact mode: the candidates the tree leaves);
* softmax mass kept (mean, 5th percentile, minimum over query heads), output relative error
  ||o - o_dense|| / ||o_dense|| (mean, max), the share of heads that fell back to dense, and (certified
  mode) the largest proven bound on the mass left out;
* decode time per token of one layer, interleaved with the dense baselines on the same inputs: torch SDPA
  with GQA (``enable_gqa=True``, K/V not expanded) and a grouped matmul-softmax-matmul (the faster dense
  path on this CPU at long context), as ratios to the faster of the two (bootstrap 95% interval over the
  timed steps); timing layers: SmolLM2 2 / 15 / 27, Gemma 3 all three global layers.

Modes: ``exact`` (the paper's tree index, tau from a reservoir at budget 0.05, with and without the dense
fallback), ``block`` at mass targets 0.99 and 0.95, ``certified`` at tolerance 0.01 and 0.1, each with the
measured dense fallback and, to show what the selection itself needs, without it (``no fallback``), and
``all-dense`` (the block mode at mass target 1, which no row reaches within its budget: every step plans in
full and then takes the dense fallback on every head, the worst case of "never slower than dense"; with
``dense_fallback=0`` the plan would be skipped, which is cheaper).
Beside them, the ordering study: to capture 99% / 95% of each head's true mass, the fraction of blocks a kv
head reads (union over its query heads) in the order of the block's true mass (the oracle), of our log-mass
estimate, of the box bound, and of the centroid score, on PCA-permuted and on positional blocks.
The scheduled rows also give the suggested ``min_keys`` (`suggested_min_keys`): the smallest measured key
count from which every scheduled mode stays within 1.1x of dense, to compare with the graft's `MIN_KEYS`.

    python3 benchmarks/range_search.py                          # both models, all lengths (long: ~1 h)
    python3 benchmarks/range_search.py --models gemma-3-270m --lengths 16384 32768
    python3 benchmarks/range_search.py --calibrate              # the dense_fallback crossover
Writes JSON (--json) and a markdown table (--md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from range_search_captures import (
    CAPTURE_TOKENS,
    QUERIES_PER_LENGTH,
    QUERY_STRIDE,
    benchmark_lengths,
    load_capture,
)

from graftlm.adapters.range_search import (
    MIN_KEYS,
    RangeSearchConfig,
    default_dense_fallback,
    forced_keys,
    range_search_decode,
)
from graftlm.kernels.range_search import (
    BlockIndex,
    DenseSchedule,
    KeyReservoir,
    RangeSearchIndex,
    attended_keys,
    block_sparse_decode,
    dense_rows,
)
from graftlm.kernels.range_search.block_attention import add_blocks, exact_part
from graftlm.kernels.range_search.index import pca_tree_order

TIMING_LAYERS = {"smollm2-135m": [2, 15, 27], "gemma-3-270m": [5, 11, 17]}
N_SINK, WINDOW, FLUSH = 4, 256, 256
EXACT_BUDGET = 0.05
MODES = {
    "exact (no fallback)": {"mode": "exact", "dense_fallback": 1.0},
    "exact": {"mode": "exact"},
    "block@0.99": {"mode": "block", "mass_target": 0.99},
    "block@0.99 (no fallback)": {"mode": "block", "mass_target": 0.99, "dense_fallback": 1.0},
    "block@0.95": {"mode": "block", "mass_target": 0.95},
    "block@0.95 (no fallback)": {"mode": "block", "mass_target": 0.95, "dense_fallback": 1.0},
    "certified@0.01": {"mode": "certified", "tolerance": 0.01},
    "certified@0.1": {"mode": "certified", "tolerance": 0.1},
    "certified@0.1 (no fallback)": {"mode": "certified", "tolerance": 0.1, "dense_fallback": 1.0},
    "all-dense": {"mode": "block", "mass_target": 1.0},
}


# ------------------------------------------------------------------ one decode step per mode
class LayerState:
    """The indexes of one captured layer, following its keys as decode would."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, first: int):
        self.keys, self.values = keys, values
        h_kv, d = keys.shape[1], keys.shape[3]
        self.blocks = BlockIndex(1, h_kv, d, values.shape[3], block_keys=16, flush_keys=FLUSH, cluster_keys=1024,
                                 window=WINDOW, n_sink=N_SINK, bounds=True)
        self.tree = RangeSearchIndex.build(keys[:, :, :first])
        self.reservoir = KeyReservoir(1024, seed=0)
        self.reservoir.add(keys[:, :, :first])
        self.n = first

    def advance(self, n: int) -> None:
        """Sync every index to the first n keys (the tree and reservoir get the new keys, the blocks flush)."""
        if n > self.n:
            self.tree.append(self.keys[:, :, self.n:n])
            self.reservoir.add(self.keys[:, :, self.n:n])
        self.n = n
        self.blocks.sync(self.keys[:, :, :n], self.values[:, :, :n])

    def step(self, name: str, q: torch.Tensor, scale: float):
        """One decode step of mode ``name`` on the first n keys: (out [1, H_q, D_v], info)."""
        k, v = self.keys[:, :, :self.n], self.values[:, :, :self.n]
        options = dict(MODES[name])
        mode = options.pop("mode")
        options.setdefault("dense_fallback", default_dense_fallback(mode, q.shape[-1]))
        if mode == "exact":
            tau = self.reservoir.threshold(q, EXACT_BUDGET)
            forced = forced_keys(None, 1, self.n, N_SINK, WINDOW, k.device)
            out = range_search_decode(q, k, v, self.tree, tau, forced=forced, key_mask=None, scale=scale, **options)
            return out, {"tau": tau}
        return block_sparse_decode(q, k, v, self.blocks, scale=scale, mode=mode, **options)


def dense_sdpa(q, k, v, scale):
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]


def dense_matmul(q, k, v, scale, index: BlockIndex):
    return dense_rows(index.group_queries(q), k, v, None, scale).reshape(q.shape[0], q.shape[1], -1)


# ------------------------------------------------------------------ quality
def softmax_mass(q, k, scale, attended_kv: torch.Tensor) -> torch.Tensor:
    """Exact softmax mass on the attended keys per query head: q [1, H_q, D], attended_kv [H_kv, N] -> [H_q]."""
    h_kv = k.shape[1]
    group = q.shape[1] // h_kv
    logits = scale * torch.matmul(q[0].view(h_kv, group, -1), k[0].transpose(1, 2))
    p = torch.softmax(logits, -1)
    return (p * attended_kv[:, None, :]).sum(-1).reshape(-1)


def exact_mode_attended(state: LayerState, q, tau) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys the exact mode attends per query head [H_q, N] and the tree's candidate fraction per head [H_q]."""
    rows, _ = state.tree.candidates(q, tau)
    cand = torch.bincount(rows, minlength=q.shape[1]).float() / state.n
    k = state.keys[:, :, :state.n]
    h_kv, group = k.shape[1], q.shape[1] // k.shape[1]
    scores = torch.matmul(q[0].view(h_kv, group, -1), k[0].transpose(1, 2)).reshape(q.shape[1], -1)
    forced = forced_keys(None, 1, state.n, N_SINK, WINDOW, k.device)[0]
    return (scores >= tau[0, :, None]) | forced, cand


def quality(capture: dict, length: int, modes: list[str]) -> dict:
    """Per mode: per (layer, query head) metrics over the length's queries; plus per layer timing inputs."""
    per_mode = {m: {"read": [], "mass": [], "err": [], "dense": [], "bound": [], "head": {}} for m in modes}
    positions = [p for p in capture["query_positions"] if length - QUERY_STRIDE * QUERIES_PER_LENGTH <= p < length]
    for layer in capture["layers"]:
        keys, values, scale = capture["keys"][layer], capture["values"][layer], capture["scaling"][layer]
        state = LayerState(keys, values, positions[0] + 1)
        for p in positions:
            state.advance(p + 1)
            q = capture["queries"][layer][capture["query_positions"].index(p)][None]
            k, v = keys[:, :, :p + 1], values[:, :, :p + 1]
            dense = dense_sdpa(q, k, v, scale)
            for m in modes:
                out, info = state.step(m, q, scale)
                err = ((out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp(min=1e-30))[0]
                group = q.shape[1] // k.shape[1]
                if MODES[m]["mode"] == "exact":
                    kept, cand = exact_mode_attended(state, q, info["tau"])
                    fallback = MODES[m].get("dense_fallback", default_dense_fallback("exact", q.shape[-1]))
                    dense_heads = state.tree.candidate_fraction(q, info["tau"]) > fallback
                    logits = scale * torch.matmul(q[0].view(k.shape[1], group, -1), k[0].transpose(1, 2))
                    mass = (torch.softmax(logits, -1).reshape(q.shape[1], -1) * kept).sum(-1)
                    head_read = torch.where(dense_heads, 1.0, cand).tolist()  # per query head
                    read = head_read
                    dense_share = dense_heads.float().mean().item()
                else:
                    att = attended_keys(info, state.blocks, None)
                    mass = softmax_mass(q, k, scale, att)
                    read = att.float().mean(-1).tolist()  # per kv head
                    head_read = [read[h // group] for h in range(q.shape[1])]
                    dense_share = sum(info.dense) / len(info.dense)
                    if info.bound is not None:
                        per_mode[m]["bound"].append(info.bound.max().item())
                r = per_mode[m]
                r["read"] += read
                r["mass"] += mass.tolist()
                r["err"] += err.tolist()
                r["dense"].append(dense_share)
                for h in range(q.shape[1]):
                    head = r["head"].setdefault(f"{layer}.{h}", {"mass": [], "err": [], "read": []})
                    head["mass"].append(mass[h].item())
                    head["err"].append(err[h].item())
                    head["read"].append(head_read[h])
    summary = {}
    for m, r in per_mode.items():
        mass, err = torch.tensor(r["mass"]), torch.tensor(r["err"])
        heads = {h: {k: statistics.fmean(v) for k, v in x.items()} for h, x in r["head"].items()}
        worst = min(heads.items(), key=lambda kv: kv[1]["mass"])
        summary[m] = {
            "keys_read": statistics.fmean(r["read"]), "mass_mean": mass.mean().item(),
            "mass_p5": mass.quantile(0.05).item(), "mass_min": mass.min().item(), "err_mean": err.mean().item(),
            "err_max": err.max().item(), "dense_share": statistics.fmean(r["dense"]),
            "bound_max": max(r["bound"]) if r["bound"] else None,
            "worst_head": {"head": worst[0], **worst[1]},
            "heads_read_max": max(v["read"] for v in heads.values()), "per_head": heads,
        }
    return summary


# ------------------------------------------------------------------ timing
def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of median(a) / median(b), resampling the timed steps."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                    for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def _time_layer(capture: dict, layer: int, length: int, modes: list[str], reps: int, times: dict) -> None:
    keys, values, scale = capture["keys"][layer], capture["values"][layer], capture["scaling"][layer]
    p = max(x for x in capture["query_positions"] if x < length)
    state = LayerState(keys, values, p + 1)
    state.advance(p + 1)
    q = capture["queries"][layer][capture["query_positions"].index(p)][None]
    k, v = keys[:, :, :p + 1], values[:, :, :p + 1]
    fns = {"sdpa": lambda: dense_sdpa(q, k, v, scale),
           "dense matmul": lambda: dense_matmul(q, k, v, scale, state.blocks)}
    for m in modes:
        fns[m] = lambda m=m: state.step(m, q, scale)
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)


def timing(capture: dict, length: int, layers: list[int], modes: list[str], reps: int) -> dict:
    """Median ms per decode step of one layer, interleaved, at the length's last query position."""
    times = {name: [] for name in ["sdpa", "dense matmul", *modes]}
    for layer in layers:
        _time_layer(capture, layer, length, modes, reps, times)
    out = {"sdpa_ms": statistics.median(times["sdpa"]), "dense_matmul_ms": statistics.median(times["dense matmul"])}
    best = "sdpa" if out["sdpa_ms"] <= out["dense_matmul_ms"] else "dense matmul"
    out["best_dense"] = best
    for m in modes:
        ms = statistics.median(times[m])
        lo, hi = bootstrap_ratio(times[best], times[m])
        out[m] = {"ms": ms, "speed_vs_best_dense": statistics.median(times[best]) / ms, "interval": [lo, hi],
                  "speed_vs_sdpa": out["sdpa_ms"] / ms}
    return out


SCHEDULED = ["block@0.99", "certified@0.01", "all-dense"]
SCHEDULE_STEPS = 64
WORST_SPEED = 1 / 1.1  # issue 19: a layer that cannot prune costs at most 1.1x dense attention


def scheduled_run(state: LayerState, name: str, q: torch.Tensor, scale: float) -> int:
    """SCHEDULE_STEPS decode steps of mode ``name`` (or "dense matmul") through a fresh `DenseSchedule` at
    the graft's defaults; returns how many steps planned."""
    k, v = state.keys[:, :, :state.n], state.values[:, :, :state.n]
    if name == "dense matmul":
        for _ in range(SCHEDULE_STEPS):
            dense_matmul(q, k, v, scale, state.blocks)
        return 0
    defaults = RangeSearchConfig()
    schedule = DenseSchedule(defaults.recheck_every, defaults.recheck_max)
    fallback = MODES[name].get("dense_fallback", default_dense_fallback(MODES[name]["mode"], q.shape[-1]))
    for _ in range(SCHEDULE_STEPS):
        if schedule.plan_now():
            _, plan = state.step(name, q, scale)
            schedule.record(plan, state.blocks, fallback)
        else:
            dense_matmul(q, k, v, scale, state.blocks)
    return schedule.n_planned


def scheduled_timing(capture: dict, length: int, layers: list[int], modes: list[str], reps: int) -> dict:
    """Per-token ms of SCHEDULE_STEPS consecutive decode steps of one layer through the graft's plan-or-dense
    schedule (`DenseSchedule` at the graft's defaults: a plan that does not pay starts a dense streak of 16,
    then 32, 64 ... steps), against as many steps of the grouped dense matmul, interleaved. Every step
    answers the length's last query (so a plan that fails fails each time it is tried): the cost of a layer
    whose keys cannot be pruned, amortised as decode amortises it."""
    names = ["dense matmul", *modes]
    times = {name: [] for name in names}
    planned = {name: [] for name in names}
    for layer in layers:
        keys, values, scale = capture["keys"][layer], capture["values"][layer], capture["scaling"][layer]
        p = max(x for x in capture["query_positions"] if x < length)
        state = LayerState(keys, values, p + 1)
        state.advance(p + 1)
        q = capture["queries"][layer][capture["query_positions"].index(p)][None]
        for name in names:
            scheduled_run(state, name, q, scale)
        for _ in range(reps):
            for name in names:
                start = time.perf_counter()
                planned[name].append(scheduled_run(state, name, q, scale))
                times[name].append((time.perf_counter() - start) * 1e3 / SCHEDULE_STEPS)
    dense = statistics.median(times["dense matmul"])
    out = {"steps": SCHEDULE_STEPS, "dense_matmul_ms": dense}
    for m in modes:
        ms = statistics.median(times[m])
        lo, hi = bootstrap_ratio(times["dense matmul"], times[m])
        out[m] = {"ms": ms, "speed_vs_dense_matmul": dense / ms, "interval": [lo, hi],
                  "planned_steps": statistics.fmean(planned[m])}
    return out


def suggested_min_keys(report: dict) -> int | None:
    """The smallest measured key count from which on (every longer measured length too, on every model) each
    scheduled mode decodes at >= WORST_SPEED of the dense matmul (median): where the graft's ``min_keys``
    should sit on this machine. None when even the longest length misses."""
    speeds: dict[int, float] = {}
    for rows in report["models"].values():
        for length, row in rows.items():
            for name in SCHEDULED:
                if name in row.get("scheduled", {}):
                    speed = row["scheduled"][name]["speed_vs_dense_matmul"]
                    speeds[int(length)] = min(speeds.get(int(length), speed), speed)
    suggested = None
    for length in sorted(speeds, reverse=True):
        if speeds[length] < WORST_SPEED:
            break
        suggested = length
    return suggested


def calibrate(capture: dict, length: int, layer: int, fractions: list[float], reps: int) -> dict:
    """ms of the block path reading a fixed fraction of every kv head's blocks, vs dense matmul."""
    keys, values, scale = capture["keys"][layer], capture["values"][layer], capture["scaling"][layer]
    p = max(x for x in capture["query_positions"] if x < length)
    state = LayerState(keys, values, p + 1)
    state.advance(p + 1)
    q = capture["queries"][layer][capture["query_positions"].index(p)][None]
    k, v, index = keys[:, :, :p + 1], values[:, :, :p + 1], state.blocks
    qg = index.group_queries(q)

    def at(fraction):
        exact = exact_part(qg, k, v, index, None, scale)
        est = index.log_mass_estimates(qg, scale)
        order = est.amax(1).argsort(-1, descending=True)
        count = int(fraction * index.n_blocks)
        return add_blocks(exact, qg, index, [order[r, :count] for r in range(qg.shape[0])], scale).output()

    fns = {"dense matmul": lambda: dense_matmul(q, k, v, scale, index), "sdpa": lambda: dense_sdpa(q, k, v, scale)}
    for f in fractions:
        fns[f] = lambda f=f: at(f)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    dense = statistics.median(times["dense matmul"])
    return {"layer": layer, "length": length, "dense_matmul_ms": dense, "sdpa_ms": statistics.median(times["sdpa"]),
            "fraction_ms": {str(f): statistics.median(times[f]) for f in fractions},
            "fraction_over_dense": {str(f): statistics.median(times[f]) / dense for f in fractions}}


# ------------------------------------------------------------------ ordering study
def ordering(capture: dict, length: int, targets=(0.99, 0.95)) -> dict:
    """Fraction of blocks (16 keys) a kv head must read, union over its query heads, to capture each
    target of every head's true softmax mass (sinks + window always attended), per ordering signal."""
    results = {}
    positions = [p for p in capture["query_positions"] if length - QUERY_STRIDE * QUERIES_PER_LENGTH <= p < length]
    bs = 16
    for layer in capture["layers"]:
        keys_all, scale = capture["keys"][layer][0], capture["scaling"][layer]
        for p in positions[-4:]:
            q = capture["queries"][layer][capture["query_positions"].index(p)]
            group = q.shape[0] // keys_all.shape[0]
            for g in range(keys_all.shape[0]):
                qg, keys = q[g * group:(g + 1) * group], keys_all[g, :p + 1]
                forced = torch.cat([keys[:N_SINK], keys[p + 1 - WINDOW:]])
                region = keys[N_SINK:p + 1 - WINDOW]
                m = region.shape[0] // bs
                forced = torch.cat([forced, region[m * bs:]])
                region = region[:m * bs]
                forced_lse = torch.logsumexp(scale * (forced @ qg.T), 0)
                for layout in ("pca", "position"):
                    blocks = region
                    if layout == "pca":
                        parts = [region[s:s + 1024][pca_tree_order(region[None, s:s + 1024], bs)[0][0]]
                                 for s in range(0, m * bs, 1024)]
                        blocks = torch.cat(parts)
                    kb = blocks.view(m, bs, -1)
                    lse = torch.logsumexp(scale * (qg @ blocks.T).view(group, m, bs), -1)
                    mean, var = kb.mean(1), kb.var(1, unbiased=False)
                    signals = {
                        "oracle": lse,
                        "estimate": scale * qg @ mean.T + 0.5 * scale * scale * (qg * qg) @ var.T,
                        "box bound": scale * (qg.clamp(min=0) @ kb.amax(1).T + qg.clamp(max=0) @ kb.amin(1).T),
                        "centroid": scale * qg @ mean.T,
                    }
                    total = torch.logaddexp(torch.logsumexp(lse, -1), forced_lse)
                    true_share, forced_share = torch.exp(lse - total[:, None]), torch.exp(forced_lse - total)
                    for name, signal in signals.items():
                        share = torch.softmax(signal, -1)
                        order = share.amax(0).argsort(descending=True)
                        captured = forced_share[:, None] + true_share[:, order].cumsum(-1)
                        for t in targets:
                            need = torch.where(forced_share >= t, 0, (captured < t).sum(-1) + 1).amax().item()
                            results.setdefault(f"{layout} {name} @{t}", []).append(min(need, m) / m)
    return {k: statistics.fmean(v) for k, v in results.items()}


# ------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    lines = [(f"Real-key decode attention, one layer, {report['date']}, {report['machine']}, torch threads "
              f"{report['threads']}. Speed = best dense (SDPA-GQA or grouped matmul, whichever is faster) / mode, "
              "median of interleaved steps, [95% bootstrap interval]."), ""]
    lines += [("| model | keys | mode | keys read | mass mean / p5 / min | rel. err mean / max | dense heads | ms | "
               "speed vs best dense | vs SDPA |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for model, rows in report["models"].items():
        for length, row in rows.items():
            t = row["timing"]
            lines.append(f"| {model} | {length} | SDPA (GQA) / dense matmul | 1.000 | 1 | 0 | - | "
                         f"{t['sdpa_ms']:.2f} / {t['dense_matmul_ms']:.2f} | - | - |")
            for m, q in row["quality"].items():
                tm = t.get(m, {})
                speed = f"{tm['speed_vs_best_dense']:.2f}x [{tm['interval'][0]:.2f}, {tm['interval'][1]:.2f}]" if tm \
                    else "-"
                bound = f", bound {q['bound_max']:.3f}" if q["bound_max"] is not None else ""
                lines.append(
                    f"| {model} | {length} | {m} | {q['keys_read']:.3f} | {q['mass_mean']:.4f} / {q['mass_p5']:.4f} / "
                    f"{q['mass_min']:.4f} | {q['err_mean']:.4f} / {q['err_max']:.4f} | {q['dense_share']:.2f}{bound} | "
                    f"{tm.get('ms', float('nan')):.2f} | {speed} | {tm.get('speed_vs_sdpa', float('nan')):.2f}x |")
    sched = [(model, length, row["scheduled"]) for model, rows in report["models"].items()
             for length, row in rows.items() if row.get("scheduled")]
    if sched:
        lines += ["", (f"Through the plan-or-dense schedule: per-token ms over {sched[0][2]['steps']} consecutive "
                       "decode steps of one layer (the graft's DenseSchedule: a plan that does not pay starts a dense "
                       "streak of 16, 32, 64 ... steps), vs as many steps of the grouped dense matmul, interleaved; "
                       "every step answers the same (last) query."), "",
                  ("| model | keys | mode | planned steps | ms / token | dense matmul ms | speed vs dense matmul | "
                   f"graft at defaults (min_keys {report['min_keys']}) |"),
                  "|---|---|---|---|---|---|---|---|"]
        for model, length, t in sched:
            at_defaults = "this schedule" if int(length) >= report["min_keys"] else "the model's own attention"
            for m in SCHEDULED:
                if m in t:
                    r = t[m]
                    lines.append(f"| {model} | {length} | {m} | {r['planned_steps']:.1f} of {t['steps']} | "
                                 f"{r['ms']:.2f} | {t['dense_matmul_ms']:.2f} | {r['speed_vs_dense_matmul']:.2f}x "
                                 f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}] | {at_defaults} |")
        lines += ["", (f"Suggested min_keys on this machine: {report['suggested_min_keys']} (the smallest measured "
                       f"key count from which every scheduled mode runs at >= {WORST_SPEED:.2f}x of the dense "
                       "matmul, median; None: no measured length does).")]
    lines += ["", ("Ordering study: fraction of 16-key blocks a kv head reads (union over its query heads) to "
                   "capture the target of every head's true softmax mass (sinks + 256-key window always attended)."), ""]
    names = sorted({k for rows in report["models"].values() for r in rows.values() for k in r.get("ordering", {})})
    if names:
        lines += [("| model | keys | " + " | ".join(names) + " |"), "|---|---|" + "---|" * len(names)]
        for model, rows in report["models"].items():
            for length, row in rows.items():
                if row.get("ordering"):
                    lines.append(f"| {model} | {length} | " + " | ".join(f"{row['ordering'][n]:.3f}" for n in names)
                                 + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CAPTURE_TOKENS), choices=list(CAPTURE_TOKENS))
    parser.add_argument("--lengths", type=int, nargs="+", help="key counts (default: 2048 ... capture length)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--reps", type=int, default=10, help="timed steps per layer and mode")
    parser.add_argument("--schedule-reps", type=int, default=3, help="timed runs per layer of the scheduled steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-ordering", action="store_true")
    parser.add_argument("--calibrate", action="store_true", help="only measure the dense_fallback crossover")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"date": datetime.date.today().isoformat(), "machine": "2-core CPU, no GPU", "threads": args.threads,
              "torch": torch.__version__, "command": "python3 benchmarks/range_search.py " + " ".join(argv or sys.argv[1:]),
              "models": {}}
    with torch.no_grad():
        for model in args.models:
            capture = load_capture(model, CAPTURE_TOKENS[model])
            lengths = args.lengths or benchmark_lengths(CAPTURE_TOKENS[model])
            rows = report["models"].setdefault(model, {})
            for length in [n for n in lengths if n <= CAPTURE_TOKENS[model]]:
                if args.calibrate:
                    rows[length] = {"calibrate": [calibrate(capture, length, layer, [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                                            args.reps) for layer in TIMING_LAYERS[model]]}
                    print(json.dumps(rows[length]), flush=True)
                    continue
                row = {"quality": quality(capture, length, args.modes),
                       "timing": timing(capture, length, TIMING_LAYERS[model], args.modes, args.reps)}
                scheduled = [m for m in SCHEDULED if m in args.modes]
                if scheduled:
                    row["scheduled"] = scheduled_timing(capture, length, TIMING_LAYERS[model], scheduled,
                                                        args.schedule_reps)
                if not args.no_ordering:
                    row["ordering"] = ordering(capture, length)
                rows[length] = row
                print(json.dumps({model: {length: {k: v for k, v in row.items() if k != "quality"}}}), flush=True)
    report["min_keys"] = MIN_KEYS
    report["suggested_min_keys"] = None if args.calibrate else suggested_min_keys(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.calibrate:
        text = markdown(report)
        print(text)
        if args.md:
            Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
