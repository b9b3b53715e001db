"""Does SST help? (issue 4, part 8) On an embedded checkpoint and a multi-step arithmetic task:

* frozen base vs SST (blend + gates) vs LoRA with the same trainable-parameter budget, same data and steps;
* with the trained SST: fixed deliberation depth 1, fixed depth 4, the halting probe's depth, and the
  oracle (a question counts as solved if any depth 1..4 solves it: an upper bound no policy can beat).

    python3 benchmarks/sst_does_it_help.py [--model smollm2-135m] [--steps 60] [--n-eval 64] [--n-probe 64]

The probe is fitted on questions from the training seed, scored on the held-out seed. Prints JSON and a
table, writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def score_with_depths(model, tokenizer, task, examples, max_depth: int, batch_size: int = 16):
    """Per example and depth 1..max_depth: correct [N, D] (bool), and the probe's features [N, d]."""
    from graftlm.adapters.sst_deliberation import collect_depth_labels

    def is_correct(index, text):
        completion = text.split("\n")[0]
        return task.is_correct(task.extract_answer(completion), examples[index].answer)

    return collect_depth_labels(model, tokenizer, [e.prompt for e in examples], is_correct,
                                max_new_tokens=task.max_new_tokens, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--n-probe", type=int, default=64)
    parser.add_argument("--out", default="out/sst_does_it_help")
    args = parser.parse_args()

    from graftlm import load_model
    from graftlm.adapters.sst_deliberation import fit_halting_probe, probe_depths
    from graftlm.demo import EVAL_SEED, TASK, TASK_KWARGS, score_task, train_graft
    from graftlm.eval import get_task
    from graftlm.recipes.budget import lora_rank_for_budget

    started = time.perf_counter()
    out = Path(args.out)
    n_train = args.steps * 8
    model, tokenizer = load_model(args.model)
    results = {"frozen base": score_task(model, tokenizer, args.n_eval)["accuracy"]}

    sst_run = train_graft(model, tokenizer, {"type": "sst"}, 3e-2, args.steps, n_train, out / "sst")
    sst = sst_run.model
    results["SST (depth 1, two-pass prefill)"] = score_task(sst, tokenizer, args.n_eval)["accuracy"]

    lora_base, _ = load_model(args.model)
    rank = lora_rank_for_budget(lora_base, sst_run.summary["trainable_params"], ["v_proj"])
    lora_run = train_graft(lora_base, tokenizer, {"type": "lora", "r": rank, "target_modules": ["v_proj"]}, 1e-3,
                           args.steps, n_train, out / "lora")
    results[f"LoRA same budget (r={rank})"] = score_task(lora_run.model, tokenizer, args.n_eval)["accuracy"]
    del lora_run, lora_base

    graft = sst.grafts["default"]
    task = get_task(TASK, **TASK_KWARGS)
    padding_side = tokenizer.padding_side
    probe_set = score_with_depths(sst, tokenizer, task, task.examples(args.n_probe, seed=1),
                                  graft.config.max_deliberation)
    probe_train_accuracy = fit_halting_probe(graft, probe_set["features"], probe_set["labels"])
    held_out = score_with_depths(sst, tokenizer, task, task.examples(args.n_eval, seed=EVAL_SEED),
                                 graft.config.max_deliberation)
    tokenizer.padding_side = padding_side
    correct = held_out["correct"]
    chosen = probe_depths(graft, held_out["features"])
    results["SST exact prefill, fixed depth 1"] = float(correct[:, 0].float().mean())
    results["SST exact prefill, fixed depth 4"] = float(correct[:, 3].float().mean())
    results["SST, probe-chosen depth"] = float(correct[torch.arange(len(chosen)), chosen - 1].float().mean())
    results["SST, oracle depth (upper bound)"] = float(correct.any(1).float().mean())

    report = {
        "model": args.model, "task": TASK, "task_kwargs": TASK_KWARGS, "steps": args.steps, "n_eval": args.n_eval,
        "n_probe": args.n_probe, "accuracy": results,
        "sst_trainable_params": sst_run.summary["trainable_params"],
        "probe_train_accuracy": probe_train_accuracy,
        "probe_label_counts": torch.bincount(probe_set["labels"], minlength=5)[1:].tolist(),
        "probe_chosen_depth_counts": torch.bincount(chosen, minlength=5)[1:].tolist(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    width = max(len(k) for k in results)
    print(f"\n{TASK} {TASK_KWARGS} on {args.model}, {args.n_eval} held-out questions, {args.steps} training steps")
    for name, value in results.items():
        print(f"  {name:<{width}}  {value:.3f}")
    print(f"  probe: train accuracy {probe_train_accuracy:.2f}, labels per depth {report['probe_label_counts']}, "
          f"chosen per depth {report['probe_chosen_depth_counts']}")


if __name__ == "__main__":
    main()
