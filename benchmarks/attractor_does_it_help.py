"""Does the attractor head help, and does the backbone internalise the equilibrium? (issue 5, parts 4 and 8)

On an embedded checkpoint and the demo's arithmetic task (held-out seed), same data and steps for all:

* frozen base;
* Attractor head alone (the backbone frozen);
* Attractor head + LoRA on the backbone (rank ``--lora-r``): the only way internalisation can appear;
* the same backbone LoRA alone (rank ``--lora-r``, same modules and learning rate): what the head adds
  on top of it;
* LoRA with the same trainable-parameter budget as the head alone (``v_proj``, rank from the budget).

For each attractor system, before and after training: the relative residual at the first guess
``||g(c) - c|| / ||c||`` (mean over the held-out prompts, from ``iteration_budget(0)``) and accuracy with
0 solver updates (y = c: the backbone alone, with its LoRA when there is one), 1 update, and the full
solve (``max_iter`` of the config). Internalisation means the first-guess residual falls and the
0-iteration accuracy rises towards the full solve's.

    python3 benchmarks/attractor_does_it_help.py [--model smollm2-135m] [--steps 60] [--n-eval 64]

Prints JSON and a table, writes report.json to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SAME_BUDGET_LORA_LR = 1e-3  # the demo's LoRA baseline


def first_guess_residual(model, tokenizer, graft, prompts: list[str], batch_size: int = 16) -> float:
    """Mean over prompts of ||g(c) - c|| / ||c|| over each prompt's positions (one forward, 0 updates)."""
    residuals = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad(), graft.iteration_budget(0):
                model(**batch)
            residuals.append(graft.last_solve_info["residual"].float())
    finally:
        tokenizer.padding_side = padding_side
    return float(torch.cat(residuals).mean())


def measure(model, tokenizer, graft, prompts, n_eval: int) -> dict:
    """First-guess residual and accuracy at 0, 1 and full solver updates."""
    from graftlm.demo import score_task

    row = {"first_guess_residual": first_guess_residual(model, tokenizer, graft, prompts)}
    for label, budget in (("acc_0_iter", 0), ("acc_1_iter", 1), ("acc_full", None)):
        if budget is None:
            result = score_task(model, tokenizer, n_eval)
        else:
            with graft.iteration_budget(budget):
                result = score_task(model, tokenizer, n_eval)
        row[label] = result["accuracy"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="learning rate of the attractor systems and of the backbone-LoRA control")
    parser.add_argument("--lora-r", type=int, default=4, help="backbone LoRA rank of the internalisation run")
    parser.add_argument("--out", default="out/attractor_does_it_help")
    args = parser.parse_args()

    from graftlm import load_model
    from graftlm.demo import EVAL_SEED, TASK, TASK_KWARGS, score_task, train_graft, training_figures
    from graftlm.eval import get_task
    from graftlm.recipes.budget import lora_rank_for_budget

    started = time.perf_counter()
    out = Path(args.out)
    n_train = args.steps * 8
    prompts = [e.prompt for e in get_task(TASK, **TASK_KWARGS).examples(args.n_eval, seed=EVAL_SEED)]
    model, tokenizer = load_model(args.model)
    accuracy = {"frozen base": score_task(model, tokenizer, args.n_eval)["accuracy"]}
    internalisation = {}
    summaries = {}

    for name, spec in (("attractor", {"type": "attractor"}),
                       (f"attractor + backbone LoRA r={args.lora_r}", {"type": "attractor", "lora_r": args.lora_r})):
        from graftlm import attach_adapter
        from graftlm.adapters.attractor import AttractorConfig

        base, _ = load_model(args.model)
        config = AttractorConfig(**{k: v for k, v in spec.items() if k != "type"})
        fresh = attach_adapter(base, config)
        before = measure(fresh, tokenizer, fresh.grafts["default"], prompts, args.n_eval)
        fresh.detach()
        run = train_graft(base, tokenizer, spec, args.lr, args.steps, n_train, out / name.replace(" ", "_"))
        graft = run.model.grafts["default"]
        after = measure(run.model, tokenizer, graft, prompts, args.n_eval)
        internalisation[name] = {"before": before, "after": after}
        accuracy[name] = after["acc_full"]
        summaries[name] = training_figures(run)
        print(name, json.dumps(internalisation[name]), flush=True)
        del run, base, fresh

    head_params = summaries["attractor"]["trainable_params"]
    lora_base, _ = load_model(args.model)
    rank = lora_rank_for_budget(lora_base, head_params, ["v_proj"])
    lora_run = train_graft(lora_base, tokenizer, {"type": "lora", "r": rank, "target_modules": ["v_proj"]},
                           SAME_BUDGET_LORA_LR, args.steps, n_train, out / "lora")
    lora_name = f"LoRA same budget as the head (v_proj r={rank})"
    accuracy[lora_name] = score_task(lora_run.model, tokenizer, args.n_eval)["accuracy"]
    summaries[lora_name] = training_figures(lora_run)
    del lora_run, lora_base

    control_base, _ = load_model(args.model)
    control = train_graft(control_base, tokenizer, {"type": "lora", "r": args.lora_r}, args.lr, args.steps, n_train,
                          out / "backbone_lora_alone")
    control_name = f"backbone LoRA r={args.lora_r} alone"
    accuracy[control_name] = score_task(control.model, tokenizer, args.n_eval)["accuracy"]
    summaries[control_name] = training_figures(control)

    report = {
        "model": args.model, "task": TASK, "task_kwargs": TASK_KWARGS, "eval_seed": EVAL_SEED,
        "steps": args.steps, "n_eval": args.n_eval, "lr": args.lr, "lr_same_budget_lora": SAME_BUDGET_LORA_LR,
        "accuracy": accuracy,
        "internalisation": internalisation, "training": summaries,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\n{TASK} {TASK_KWARGS} on {args.model}, {args.n_eval} held-out questions, {args.steps} training steps")
    width = max(len(k) for k in accuracy)
    for name, value in accuracy.items():
        params = summaries.get(name, {}).get("trainable_params")
        print(f"  {name:<{width}}  {value:.3f}" + (f"   ({params:,} trainable)" if params else ""))
    print(f"\n  {'internalisation':<{width}}  {'resid0':>8} {'acc@0':>6} {'acc@1':>6} {'acc@full':>8}")
    for name, rows in internalisation.items():
        for when, row in rows.items():
            print(f"  {name + ', ' + when:<{width}}  {row['first_guess_residual']:8.4f} {row['acc_0_iter']:6.3f} "
                  f"{row['acc_1_iter']:6.3f} {row['acc_full']:8.3f}")


if __name__ == "__main__":
    main()
