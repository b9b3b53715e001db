"""Does Echo help recall? (issue 6, part 7) MQAR on an embedded checkpoint, plain causal streaming mode.

Systems (the grafted layers are the same half of the layers, every other one, for all Echo systems):

* frozen base (full attention everywhere);
* window only: the replaced layers' attention cut to the last ``--window`` tokens, Echo silent (a fresh
  replace-mode adapter, W_o = 0): what the grafted layers lose without a recall state;
* Echo parallel (K = 2): a trained branch beside the frozen attention;
* Echo replace (K = 2) and Echo replace (K = 0, plain ridge recall: the paper's ablation): window
  attention + trained Echo instead of the full attention, trained with the LM loss + LoLCATs
  distillation to the frozen attention output, the ramp rising from attention to Echo over the first
  half of training (``ramp_fraction``); scored at ramp 1, where those layers keep no KV beyond the window.

Every prompt is read causally from its first token (pairs, filler gap, queries) by the whole model: no
mode gives the branch a context/query boundary. Accuracy is exact match on the open query's value,
greedy generation, held-out seed. Training data: MQAR at ``--train-pairs`` pairs and ``--train-gap``
filler words (data seed 1).

    python3 benchmarks/echo_does_it_help.py [--model smollm2-135m] [--steps 40] [--pairs 16 64]
                                            [--gaps 0 512] [--n-eval 24] [--systems replace-k2 ...]

Prints JSON and a table; writes report.json and recall.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SYSTEM_KEYS = {"Echo parallel, K=2": "parallel-k2", "Echo replace, K=2": "replace-k2",
               "Echo replace, K=0": "replace-k0"}


def replaced_kv_bytes(model, layers: list[int], tokens: int, window: int) -> tuple[int, int]:
    """KV bytes the grafted layers hold at ``tokens`` of context: full attention vs the window."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * 2  # K and V, bf16
    return len(layers) * tokens * per_token, len(layers) * min(tokens, window) * per_token


def sweep(model, tokenizer, points, n_eval: int, value_digits: int, num_queries: int) -> dict[str, float]:
    from graftlm.eval import evaluate

    scores = {}
    for pairs, gap in points:
        kwargs = {"num_pairs": pairs, "num_queries": num_queries, "gap": gap, "value_digits": value_digits}
        result = evaluate(model, tokenizer, "mqar", kwargs, n=n_eval, seed=0, batch_size=8, progress=False)
        scores[f"{pairs} pairs, gap {gap}"] = result["accuracy"]
        print(f"    {pairs} pairs, gap {gap}: {result['accuracy']:.3f}", flush=True)
    return scores


def plot(path: Path, points, results: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p}p/g{g}" for p, g in points]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(results)
    for i, (name, scores) in enumerate(results.items()):
        ax.bar([x + i * width for x in range(len(points))], list(scores.values()), width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(points))], labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("MQAR exact match")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--gaps", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--num-queries", type=int, default=4)
    parser.add_argument("--value-digits", type=int, default=3)
    parser.add_argument("--train-pairs", type=int, default=32)
    parser.add_argument("--train-gap", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEM_KEYS.values()),
                        default=list(SYSTEM_KEYS.values()),
                        help="trained systems to run (the frozen base and window-only always run)")
    parser.add_argument("--out", default="out/echo_does_it_help")
    args = parser.parse_args()

    from graftlm import attach_adapter, load_model
    from graftlm.adapters.echo import EchoConfig
    from graftlm.demo import train_graft, training_figures
    from graftlm.eval import get_task

    started = time.perf_counter()
    out = Path(args.out)
    points = [(p, g) for g in args.gaps for p in args.pairs]
    model, tokenizer = load_model(args.model)
    layers = list(range(1, model.config.num_hidden_layers, 2))
    common = {"target_layers": layers, "rank": args.rank, "chunk_size": args.window, "window": args.window}
    train_kwargs = {"num_pairs": args.train_pairs, "num_queries": args.num_queries, "gap": args.train_gap,
                    "value_digits": args.value_digits}
    systems = {
        "Echo parallel, K=2": {"mode": "parallel", "power": 2},
        "Echo replace, K=2": {"mode": "replace", "power": 2, "distill_weight": args.distill_weight,
                              "ramp_fraction": 0.5},
        "Echo replace, K=0": {"mode": "replace", "power": 0, "distill_weight": args.distill_weight,
                              "ramp_fraction": 0.5},
    }
    systems = {name: spec for name, spec in systems.items() if SYSTEM_KEYS[name] in args.systems}

    results, training = {}, {}
    print("frozen base", flush=True)
    results["frozen base"] = sweep(model, tokenizer, points, args.n_eval, args.value_digits, args.num_queries)
    print("window only (fresh replace adapter, Echo silent)", flush=True)
    window_only = attach_adapter(model, EchoConfig(mode="replace", **common))
    results[f"window {args.window} only"] = sweep(window_only, tokenizer, points, args.n_eval, args.value_digits,
                                                  args.num_queries)
    window_only.detach()

    for name, spec in systems.items():
        print(name, flush=True)
        base, _ = load_model(args.model)
        run = train_graft(base, tokenizer, {"type": "echo", **common, **spec}, args.lr, args.steps,
                          args.steps * args.batch_size, out / name.replace(" ", "_").replace(",", ""),
                          task="mqar", task_kwargs=train_kwargs, batch_size=args.batch_size, max_length=2048)
        training[name] = training_figures(run)
        results[name] = sweep(run.model, tokenizer, points, args.n_eval, args.value_digits, args.num_queries)
        del run, base

    longest_task = get_task("mqar", num_pairs=max(args.pairs), num_queries=args.num_queries, gap=max(args.gaps),
                            value_digits=args.value_digits)
    longest = max(len(tokenizer(e.prompt).input_ids) for e in longest_task.examples(args.n_eval, seed=0))
    full_kv, window_kv = replaced_kv_bytes(model, layers, longest, args.window)
    report = {
        "model": args.model, "grafted_layers": layers, "window": args.window, "rank": args.rank,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "train_task_kwargs": train_kwargs,
        "n_eval": args.n_eval, "eval_seed": 0, "accuracy": results, "training": training,
        "grafted_layers_kv_bytes_at_longest_prompt": {"tokens": longest, "full_attention": full_kv,
                                                       "replace_mode_window": window_kv},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(out / "recall.png", points, results)
    print(json.dumps(report, indent=2))
    columns = list(next(iter(results.values())))
    width = max(len(k) for k in results)
    print(f"\nMQAR on {args.model} ({args.n_eval} held-out per point, {args.value_digits}-digit values, "
          f"{args.num_queries} queries); Echo on layers {layers[0]},{layers[1]},...,{layers[-1]}")
    print(f"  {'system':<{width}}  " + "  ".join(f"{c:>16}" for c in columns))
    for name, scores in results.items():
        print(f"  {name:<{width}}  " + "  ".join(f"{scores[c]:16.3f}" for c in columns))
    print(f"  grafted layers' KV at {longest} tokens: full attention {full_kv / 2**20:.2f} MiB, replace mode "
          f"(window {args.window}) {window_kv / 2**20:.2f} MiB + the fixed Echo state")


if __name__ == "__main__":
    main()
