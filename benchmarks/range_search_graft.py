"""Range-search graft, whole model (METHODS.md section 4; issue 19): decode time per token, greedy agreement
with dense and needle accuracy, every mode side by side with dense in one run, on an embedded checkpoint.

    python3 benchmarks/range_search_graft.py --model smollm2-135m --context 7500
    python3 benchmarks/range_search_graft.py --model gemma-3-270m --context 8192 --needle-n 10
    python3 benchmarks/range_search_graft.py --model gemma-3-270m --context 32768 --needle-n 0

Variants (one model, one graft whose config is switched per variant, each with its own cache):

* ``dense``: the graft disabled, the model's own SDPA attention (the baseline);
* ``graft dense path``: the block mode at ``mass_target=1``, which no head reaches within its budget, so
  every planned step plans in full and then takes the dense fallback (a grouped matmul) on every head, and
  the layer then backs off the plan (`DenseSchedule`): what the graft costs when it prunes nothing, and a
  control that separates the index's gain from the dense kernel's;
* ``defaults``: ``RangeSearchConfig()`` as a user gets it (block mode at 0.99; below ``min_keys`` = `MIN_KEYS`
  keys it is the model's own attention and builds no index);
* ``block@0.99``, ``block@0.95``, ``certified@0.01``, ``exact`` (the paper's tree with its defaults: reservoir
  tau at budget 0.05, dense fallback), and ``graft dense path``, all engaged from ``MODE_MIN_KEYS`` keys so
  that the modes themselves are measured at contexts below `MIN_KEYS`.

Continuation: ``--context`` tokens of real text (licences and Python sources) are prefilled once (dense, in
chunks), every variant gets a copy of that cache and decodes ``--decode-steps`` greedy tokens; steps are
interleaved across variants so all see the same machine load. Reported: median ms per token over the steps
after the first (the first builds the index; reported apart), speed vs dense with a bootstrap 95% interval
over steps, tokens equal to dense and the first step where the continuation differs, the softmax mass kept
and keys read (a tracked run of a few extra steps), the share of grafted layer steps that planned through
the index (block and certified modes; the others ran a dense streak, `kernels/range_search/schedule.py`),
and host syncs per grafted layer and step (`graftlm.host_syncs.HostSyncCounter`, one untimed step).

Needle (``graftlm.eval`` task ``needle`` at ``--context`` tokens, depths spread over the examples): each
prompt is prefilled once without its last 16 tokens, which every variant then reads one decode step at a
time before answering greedily, so the question and the answer go through the graft. Accuracy per variant
with a Wilson 95% interval and the number of examples where a variant and dense disagree.
Prints JSON lines, then markdown tables (--md), and the full report (--json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from range_search_captures import real_text_ids

import graftlm
from graftlm.adapters import RangeSearchConfig, attach_adapter
from graftlm.compare.stats import wilson_interval
from graftlm.eval.runner import build_task
from graftlm.host_syncs import HostSyncCounter
from graftlm.patches.cache_kwarg import with_cache

MODE_MIN_KEYS = 1024  # the mode variants engage from here, below the default MIN_KEYS, to be measured at 8k
VARIANTS = {
    "dense": None,
    "defaults": {},
    "graft dense path": {"mode": "block", "mass_target": 1.0, "min_keys": MODE_MIN_KEYS},
    "block@0.99": {"mode": "block", "min_keys": MODE_MIN_KEYS},
    "block@0.95": {"mode": "block", "mass_target": 0.95, "min_keys": MODE_MIN_KEYS},
    "certified@0.01": {"mode": "certified", "tolerance": 0.01, "min_keys": MODE_MIN_KEYS},
    "exact": {"mode": "exact", "min_keys": MODE_MIN_KEYS},
}
CHUNK = 1024
FORCED_TAIL = 16


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                    for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


class Runner:
    """One grafted model and per-variant configs; `step` runs one forward of a variant on its own cache."""

    def __init__(self, model_name: str, variants: list[str]):
        self.base, self.tokenizer = graftlm.load_model(model_name)
        self.configs = {name: RangeSearchConfig(**VARIANTS[name])
                        for name in variants if VARIANTS[name] is not None}
        first = next(iter(self.configs.values()), RangeSearchConfig())
        self.model = attach_adapter(self.base, dataclasses.replace(first))
        self.graft = self.model.grafts["default"]
        self.variants = variants

    def use(self, name: str) -> None:
        if VARIANTS[name] is not None:
            self.graft.config = self.configs[name]

    def prefill(self, ids: torch.Tensor):
        """Dense prefill in chunks: (cache, logits of the last position)."""
        cache = self.graft.make_cache()
        with torch.no_grad(), self.model.disable_adapter():
            for start in range(0, ids.shape[1], CHUNK):
                out = self.model(input_ids=ids[:, start:start + CHUNK], **with_cache({}, cache), use_cache=True,
                                 logits_to_keep=1)
        return cache, out.logits[:, -1]

    def fork(self, name: str, prefilled):
        """A fresh cache of the variant's kind holding a copy of the prefilled keys and values."""
        self.use(name)
        cache = self.graft.make_cache()
        cache.layers = copy.deepcopy(prefilled.layers)
        return cache

    def step(self, name: str, cache, token: torch.Tensor) -> torch.Tensor:
        self.use(name)
        with torch.no_grad():
            if VARIANTS[name] is None:
                with self.model.disable_adapter():
                    out = self.model(input_ids=token, **with_cache({}, cache), use_cache=True)
            else:
                out = self.model(input_ids=token, **with_cache({}, cache), use_cache=True)
        return out.logits[:, -1]


def continuation(runner: Runner, context: int, steps: int) -> tuple[dict, tuple]:
    """The timed continuation; also returns the prefilled cache and its last logits for `tracked`."""
    ids = real_text_ids(runner.tokenizer, context)
    t0 = time.perf_counter()
    prefilled, logits = runner.prefill(ids)
    prefill_s = time.perf_counter() - t0
    caches = {name: runner.fork(name, prefilled) for name in runner.variants}
    first_logits = logits
    tokens = {name: logits.argmax(-1, keepdim=True) for name in runner.variants}
    generated = {name: [] for name in runner.variants}
    times = {name: [] for name in runner.variants}
    for _ in range(steps):
        for name in runner.variants:
            start = time.perf_counter()
            logits = runner.step(name, caches[name], tokens[name])
            times[name].append((time.perf_counter() - start) * 1e3)
            tokens[name] = logits.argmax(-1, keepdim=True)
            generated[name].append(int(tokens[name]))
    syncs = {}
    n_layers = len(runner.graft.layer_indices)
    for name in runner.variants:
        with HostSyncCounter() as counter:
            runner.step(name, caches[name], tokens[name])
        syncs[name] = counter.total
    planned = {}
    for name in runner.variants:
        schedules = [st.schedule for st in caches[name].range_search.values() if st.schedule is not None]
        n_steps = sum(x.n_planned + x.n_dense for x in schedules)
        planned[name] = sum(x.n_planned for x in schedules) / n_steps if n_steps else None
    dense_syncs = syncs.get("dense", 0)
    dense = generated["dense"]
    result = {"context": context, "steps": steps, "prefill_s": round(prefill_s, 1), "variants": {}}
    dense_ms = times["dense"][1:]
    for name in runner.variants:
        ms = times[name][1:]
        equal = sum(a == b for a, b in zip(generated[name], dense))
        first_diff = next((i for i, (a, b) in enumerate(zip(generated[name], dense)) if a != b), None)
        lo, hi = bootstrap_ratio(dense_ms, ms)
        result["variants"][name] = {
            "ms_per_token": statistics.median(ms), "first_step_ms": times[name][0],
            "speed_vs_dense": statistics.median(dense_ms) / statistics.median(ms), "interval": [lo, hi],
            "tokens_equal": equal, "first_difference": first_diff,
            "syncs_per_layer_step": (syncs[name] - dense_syncs) / n_layers if VARIANTS[name] is not None else 0.0,
            "planned_share": planned[name],
            "text": runner.tokenizer.decode(generated[name]),
        }
    return result, (prefilled, first_logits)


def tracked(runner: Runner, prefilled, logits, steps: int = 4) -> dict:
    """Softmax mass kept and keys read per variant over a few decode steps from the same prefill (recall
    tracking costs a dense score pass, so it runs apart from the timing)."""
    for config in runner.configs.values():
        config.track_recall = True
    out = {}
    for name in runner.variants:
        if VARIANTS[name] is None:
            continue
        cache = runner.fork(name, prefilled)
        runner.graft.recall_log.clear()
        token = logits.argmax(-1, keepdim=True)
        for _ in range(steps):
            token = runner.step(name, cache, token).argmax(-1, keepdim=True)
        log = runner.graft.recall_log
        out[name] = {"mass_mean": statistics.fmean(r["mass_recall"] for r in log),
                     "mass_min": min(r.get("mass_recall_min", r["mass_recall"]) for r in log),
                     "keys_read": statistics.fmean(r["kept_fraction"] for r in log)}
        if "dense_fraction" in log[0]:
            out[name]["dense_heads"] = statistics.fmean(r["dense_fraction"] for r in log)
        bounds = [r["certified_bound"] for r in log if "certified_bound" in r]
        if bounds:
            out[name]["certified_bound_max"] = max(bounds)
        del cache
    return out


def needle(runner: Runner, context: int, n: int, seed: int = 0) -> dict:
    task = build_task("needle", {"context_length": context}, runner.tokenizer)
    examples = task.examples(n, seed)
    correct = {name: [] for name in runner.variants}
    for example in examples:
        ids = runner.tokenizer(example.prompt, return_tensors="pt").input_ids
        prefilled, _ = runner.prefill(ids[:, :-FORCED_TAIL])
        for name in runner.variants:
            cache = runner.fork(name, prefilled)
            logits = None
            for j in range(ids.shape[1] - FORCED_TAIL, ids.shape[1]):
                logits = runner.step(name, cache, ids[:, j:j + 1])
            answer = []
            for _ in range(task.max_new_tokens):
                token = logits.argmax(-1, keepdim=True)
                answer.append(int(token))
                logits = runner.step(name, cache, token)
            text = runner.tokenizer.decode(answer)
            correct[name].append(task.is_correct(task.extract_answer(text), example.answer))
            del cache
        del prefilled
        print(json.dumps({"needle": example.meta, "answer": example.answer,
                          "correct": {k: v[-1] for k, v in correct.items()}}), flush=True)
    out = {}
    for name, hits in correct.items():
        k = sum(hits)
        out[name] = {"accuracy": k / len(hits), "n": len(hits), "wilson95": wilson_interval(k, len(hits)),
                     "disagree_with_dense": sum(a != b for a, b in zip(hits, correct["dense"]))}
    return out


def markdown(report: dict) -> str:
    cont, needle_res, recall = report["continuation"], report.get("needle"), report.get("recall", {})
    lines = [(f"{report['model']}, {cont['context']} tokens of real text, {cont['steps']} greedy decode steps, "
              f"{report['date']}, {report['machine']}, torch threads {report['threads']}; speed = dense ms / "
              "variant ms (median over steps 2..n, [bootstrap 95%])."), "",
             ("| variant | ms/token | speed vs dense | first step ms | tokens equal to dense | mass kept mean / min | "
              "keys attended | planned steps | needle acc [Wilson 95%] | syncs / layer / step |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in cont["variants"].items():
        rec = recall.get(name, {})
        mass = f"{rec['mass_mean']:.4f} / {rec['mass_min']:.4f}" if rec else "1 / 1"
        keys = f"{rec['keys_read']:.3f}" if rec else "1.000"
        nd = needle_res.get(name) if needle_res else None
        acc = f"{nd['accuracy']:.2f} ({nd['n']}) [{nd['wilson95'][0]:.2f}, {nd['wilson95'][1]:.2f}]" if nd else "-"
        equal = f"{r['tokens_equal']}/{cont['steps']}" + ("" if r["first_difference"] is None else
                                                          f" (first diff. at {r['first_difference']})")
        lines.append(f"| {name} | {r['ms_per_token']:.1f} | {r['speed_vs_dense']:.2f}x [{r['interval'][0]:.2f}, "
                     f"{r['interval'][1]:.2f}] | {r['first_step_ms']:.0f} | {equal} | {mass} | {keys} | "
                     f"{'-' if r.get('planned_share') is None else format(r['planned_share'], '.2f')} | {acc} | "
                     f"{r['syncs_per_layer_step']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=7500)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--needle-n", type=int, default=10)
    parser.add_argument("--needle-context", type=int, help="needle prompt length (default: --context)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = ["dense"] + [v for v in args.variants if v != "dense"]
    report = {"model": args.model, "date": datetime.date.today().isoformat(), "machine": "2-core CPU, no GPU",
              "threads": args.threads, "command": "python3 benchmarks/range_search_graft.py " +
              " ".join(argv if argv is not None else sys.argv[1:])}
    runner = Runner(args.model, variants)
    report["continuation"], (prefilled, logits) = continuation(runner, args.context, args.decode_steps)
    print(json.dumps(report["continuation"]), flush=True)
    report["recall"] = tracked(runner, prefilled, logits)
    print(json.dumps(report["recall"]), flush=True)
    del runner, prefilled
    if args.needle_n:
        runner = Runner(args.model, variants)
        report["needle"] = needle(runner, args.needle_context or args.context, args.needle_n)
        print(json.dumps(report["needle"]), flush=True)
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
