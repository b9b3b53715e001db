"""Equilibrium internalisation (issue 14 criterion 4; METHODS.md section 2): does a backbone LoRA trained
with the Attractor head move the backbone's first guess c toward the head's fixed point?

    python3 benchmarks/attractor_internalisation.py ADAPTER_DIR ... [--task basic_arithmetic]
        [--difficulty 2] [--n 300] [--seed 0] [--json out.json]

For each saved attractor adapter (a compare run's ``<system>/seed<k>/run/adapter``) the held-out task
examples (the compare spec's evaluation: same task, n and seed) are run teacher-forced, prompt + answer,
left-padded (padding left out of every residual). With the trained head g fixed, the backbone's first
guess is taken two ways:

* "base backbone": the adapter's backbone LoRA switched off -- c is the frozen base's last hidden state,
  the first guess before any training;
* "trained backbone": the LoRA on -- c after training (an adapter without a LoRA has only this row).

Per row, over the n examples: the first-guess residual max_t ||g(c) - c|| / ||c|| (the solver's
per-position criterion; mean and median over examples; the max often sits in the prompt's shared
few-shot prefix, the same for every example), its mean over the example's tokens, the residual after
exactly 1 application of g
(||g(g(c)) - g(c)|| / ||g(c)||, same reduction), and the full solve's iterations and converged fraction.
Internalisation shows as a smaller first-guess residual and fewer iterations with the trained backbone.
Accuracy at 0 / 1 / full iterations comes from the compare spec's variants (RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from graftlm import attach_adapter, load_model
from graftlm.adapters.attractor import attention_mask
from graftlm.compare.evaluation import _left_padded, build_eval_set
from graftlm.compare.spec import EvalSpec
from graftlm.recipes.data import encode_text


def attractor_of(model):
    grafts = [g for g in model.grafts.values() if g.config.graft_type == "attractor"]
    if not grafts:
        raise SystemExit("the adapter has no attractor graft")
    return grafts[0]


@torch.no_grad()
def solve_figures(model, graft, batches) -> dict[str, float]:
    """Per example: first-guess residual, residual after one application, iterations, converged."""
    rows = {"first_guess": [], "first_guess_tokens": [], "after_one": [], "iterations": [], "converged": []}
    norm = graft.patch.final_norm(graft.base_model)
    for ids, mask in batches:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        seen = {}
        handle = norm.register_forward_pre_hook(lambda module, a, seen=seen: seen.setdefault("c", a[0]))  # after the graft
        with graft.iteration_budget(0):
            model(**kwargs)
        handle.remove()
        c = seen["c"].float()
        g_c = graft.head(c, c, attention_mask(c.shape[0], c.shape[1], 0, mask, c.device))
        per_token = (g_c - c).norm(dim=-1) / c.norm(dim=-1)  # [B, T]
        valid = mask.bool()
        rows["first_guess_tokens"] += ((per_token * valid).sum(-1) / valid.sum(-1)).tolist()
        with graft.config_overrides({"iterate": "unrolled", "max_iter": 1, "min_iter": 0}):
            model(**kwargs)
        info = graft.last_solve_info
        rows["first_guess"] += info["first_guess_residual"].tolist()
        rows["after_one"] += info["residual"].tolist()
        model(**kwargs)
        info = graft.last_solve_info
        rows["iterations"] += info["iterations"].float().tolist()
        rows["converged"] += info["converged"].float().tolist()
    out = {}
    for key in ("first_guess", "first_guess_tokens", "after_one"):
        out[f"{key}_mean"] = statistics.fmean(rows[key])
        out[f"{key}_median"] = statistics.median(rows[key])
    out["iterations_mean"] = statistics.fmean(rows["iterations"])
    out["iterations_max"] = max(rows["iterations"])
    out["converged"] = statistics.fmean(rows["converged"])
    out["n"] = len(rows["converged"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model, dtype=torch.float32)
    eval_set = build_eval_set(EvalSpec(name="held out", task=args.task, task_kwargs={"difficulty": args.difficulty},
                                       n=args.n, seed=args.seed), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_text(tokenizer, text)[0] for text in eval_set.texts]
    batches = [_left_padded(encoded[i:i + args.batch_size], pad) for i in range(0, len(encoded), args.batch_size)]
    results = []
    for path in args.adapters:
        model = attach_adapter(base, path)
        model.eval()
        graft = attractor_of(model)
        states = [("trained backbone", True)] if graft.lora is None else [("base backbone", False),
                                                                          ("trained backbone", True)]
        for label, lora_on in states:
            if graft.lora is not None:
                graft.lora.set_active(lora_on)
            results.append({"adapter": path, "backbone": label, **solve_figures(model, graft, batches)})
        if graft.lora is not None:
            graft.lora.set_active(True)
        model.detach()
    payload = {"args": vars(args), "rows": results}
    print(json.dumps(payload, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    print("\n| adapter | backbone | first-guess residual, worst position: mean (median) | token mean "
          "| after 1 application mean (median) | iterations mean (max) | converged |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['adapter']} | {r['backbone']} | {r['first_guess_mean']:.4f} ({r['first_guess_median']:.4f}) "
              f"| {r['first_guess_tokens_mean']:.4f} "
              f"| {r['after_one_mean']:.2e} ({r['after_one_median']:.2e}) | {r['iterations_mean']:.1f} "
              f"({r['iterations_max']:.0f}) | {r['converged']:.3f} |")


if __name__ == "__main__":
    main()
