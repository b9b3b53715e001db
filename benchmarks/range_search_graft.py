"""Range-search graft, "does it help" (issue 7 part 7; METHODS.md section 4): accuracy and decode speed
together, dense attention vs range-search decode at several budgets, on an embedded checkpoint.

    python3 benchmarks/range_search_graft.py [--model smollm2-135m] [--context 1536] [--needle-n 5]
        [--reasoning-task chain_sum] [--reasoning-n 10] [--budgets 1.0 0.1 0.02] [--threshold reservoir]
        [--window 32] [--n-sink 4] [--decode-steps 16] [--json out.json]

Per variant (dense = the base alone; rs@b = the graft at budget b):

* needle-in-a-haystack (``graftlm.eval`` task ``needle``, prompt of ``--context`` tokens, depths spread
  over the examples) and one reasoning-gym task (few-shot, short prompts), exact-match accuracy through
  ``graftlm.eval.evaluate`` (batched generation with left padding);
* for the graft, from ``track_recall`` over every decode step and grafted layer of those runs: the mean
  fraction of the exact softmax mass on the attended keys and the mean fraction of keys attended
  (sinks and window included);
* decode time per token of the whole model at ``--context`` keys (one needle prompt prefilled, then
  ``--decode-steps`` one-token forwards; median of the steps after the first, and the first step
  separately, since the graft builds its index there), with recall tracking off, interleaved step by
  step with the same model's dense decode (graft disabled) so both see the same machine load.

``min_keys`` is 0 and the window is short (``--window``) so that the index decides most of what is
attended even on the short reasoning prompts; with the defaults (window 256, min_keys 1024) those prompts
would decode densely. Prints JSON, then a table.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

import graftlm
from graftlm.adapters import RangeSearchConfig, attach_adapter
from graftlm.eval import evaluate
from graftlm.eval.runner import build_task
from graftlm.patches.cache_kwarg import with_cache


def graft_config(args, budget: float, track_recall: bool) -> RangeSearchConfig:
    return RangeSearchConfig(budget=budget, threshold=args.threshold, window=args.window, n_sink=args.n_sink,
                             min_keys=0, track_recall=track_recall)


def needle_prompt(tokenizer, context: int) -> torch.Tensor:
    task = build_task("needle", {"context_length": context}, tokenizer)
    return tokenizer(task.examples(1, seed=123)[0].prompt, return_tensors="pt").input_ids


def decode_timing(model, ids: torch.Tensor, steps: int) -> dict:
    """Per-token decode time of the grafted model and of the same model with the graft disabled (dense
    SDPA through a plain ``DynamicCache``), steps interleaved so both see the same machine load.

    Both prefill ids[:, :-1], then decode greedily one token per forward. Returns medians over the
    steps after the first, and the graft's first step alone (it builds the index there).
    """
    graft = model.grafts["default"]
    caches = {"graft": graft.make_cache(), "dense": DynamicCache(config=model.config)}
    tokens, times = {}, {"graft": [], "dense": []}

    def step(kind: str, token: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if kind == "dense":
            with model.disable_adapter():
                logits = model(input_ids=token, **with_cache({}, caches[kind]), use_cache=True).logits
        else:
            logits = model(input_ids=token, **with_cache({}, caches[kind]), use_cache=True).logits
        times[kind].append(time.perf_counter() - start)
        return logits[:, -1:].argmax(-1)

    with torch.no_grad():
        for kind, cache in caches.items():
            model(input_ids=ids[:, :-1], **with_cache({}, cache), use_cache=True)
            tokens[kind] = ids[:, -1:]
        for _ in range(steps + 1):
            for kind in caches:
                tokens[kind] = step(kind, tokens[kind])
    graft_s, dense_s = statistics.median(times["graft"][1:]), statistics.median(times["dense"][1:])
    return {"decode_s_per_token": round(graft_s, 4), "dense_s_per_token": round(dense_s, 4),
            "speed_vs_dense": round(dense_s / graft_s, 3), "first_step_s": round(times["graft"][0], 4),
            "index_bytes_over_kv": round(caches["graft"].index_bytes() / caches["graft"].kv_bytes(), 4)}


def recall_summary(log: list[dict]) -> dict:
    if not log:
        return {}
    return {"mass_recall": round(statistics.fmean(r["mass_recall"] for r in log), 4),
            "mass_recall_min": round(min(r["mass_recall"] for r in log), 4),
            "kept_fraction": round(statistics.fmean(r["kept_fraction"] for r in log), 4),
            "threshold_recall": round(min(r["threshold_recall"] for r in log), 4)}


def run_variant(base, tokenizer, args, budget: float | None, timing_ids: torch.Tensor) -> dict:
    name = "dense" if budget is None else f"rs@{budget:g}"
    result = {"variant": name, "budget": budget}
    tasks = [("needle", {"context_length": args.context}, args.needle_n),
             (args.reasoning_task, {"difficulty": 1}, args.reasoning_n)]
    model = base if budget is None else attach_adapter(base, graft_config(args, budget, track_recall=True))
    for task, kwargs, n in tasks:
        if budget is not None:
            model.grafts["default"].recall_log.clear()
        scored = evaluate(model, tokenizer, task, kwargs, n=n, batch_size=args.batch_size, progress=False)
        result[task] = {"accuracy": scored["accuracy"], "n": scored["n"], "wall_s": scored["wall_s"]}
        if budget is not None:
            result[task].update(recall_summary(model.grafts["default"].recall_log))
    if budget is not None:
        model.detach()
        model = attach_adapter(base, graft_config(args, budget, track_recall=False))
        result["timing"] = decode_timing(model, timing_ids, args.decode_steps)
        model.detach()
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict], args) -> str:
    task = args.reasoning_task
    lines = [(f"| variant | needle@{args.context} acc | mass recall | kept | {task} acc | mass recall | kept "
              "| decode s/token | dense s/token (same run) | first step s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        n, t, timing = r["needle"], r[task], r.get("timing", {})
        lines.append(
            f"| {r['variant']} | {n['accuracy']:.2f} ({n['n']}) | {n.get('mass_recall', '-')} | {n.get('kept_fraction', '-')} "
            f"| {t['accuracy']:.2f} ({t['n']}) | {t.get('mass_recall', '-')} | {t.get('kept_fraction', '-')} "
            f"| {timing.get('decode_s_per_token', '-')} | {timing.get('dense_s_per_token', '-')} "
            f"| {timing.get('first_step_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--needle-n", type=int, default=5)
    parser.add_argument("--reasoning-task", default="chain_sum")
    parser.add_argument("--reasoning-n", type=int, default=10)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.1, 0.02])
    parser.add_argument("--threshold", default="reservoir", choices=["reservoir", "budget"])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--n-sink", type=int, default=4)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = graftlm.load_model(args.model)
    timing_ids = needle_prompt(tokenizer, args.context)
    results = [run_variant(base, tokenizer, args, budget, timing_ids) for budget in [None, *args.budgets]]
    report = {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    print(table(results, args))


if __name__ == "__main__":
    main()
