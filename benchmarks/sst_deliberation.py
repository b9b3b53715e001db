"""SST latent deliberation with consequences (issue 13): what depth 1..4 does to a trained adapter's answers.

    python3 benchmarks/sst_deliberation.py benchmarks/compare/sst_lora_arithmetic.yaml --system "SST + LoRA r=8" \
        [--compare-dir DIR] [--seed 0] [--n-probe 300] [--limit N] [--out out/sst_deliberation/NAME]

Loads the adapter a `graftlm compare` run saved for ``--system`` (``<compare-dir>/<system>/seed<k>/run/adapter``)
and, with the exact recurrence for the prefill (METHODS.md section 1, "Inference"), answers

* the spec's held-out questions (its first task evaluation) at every fixed depth 1..max_deliberation:
  accuracy at each depth (Wilson 95% interval, exact McNemar against depth 1); the fraction of questions
  whose answer changes between depths; the oracle (a question counts when some depth answers it, the
  paper's best-depth-after-the-fact figure) and its smallest correct depth per question;
* the halting probe: fitted on ``--n-probe`` of the spec's *training* questions only (features after one
  pass, label = smallest correct depth), then the depth it picks for each held-out question and the
  accuracy at those depths (McNemar against depth 1);
* the same adapter with its blend closed (every gate 0: what the adapter's LoRA alone answers), against
  depth 1: the blend's own effect at inference;
* why depth does or does not change an answer: the first answer token's top-1 / top-2 logit margin and
  how far depths 2..4 move its logits, and the trained blend (per-layer gates and mean c = g a).

Writes ``deliberation.json`` (every per-question record) and ``deliberation.md`` (the tables) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _questions(spec, tokenizer):
    """(task, held-out examples, training examples kept apart from the held-out questions)."""
    from graftlm.compare.evaluation import question_of
    from graftlm.recipes.sources import make_task

    evaluation = next(e for e in spec.evals if e.kind == "task")
    task = make_task(evaluation.task, evaluation.task_kwargs, tokenizer)
    held_out = list(task.examples(evaluation.n, evaluation.seed))
    scored = {question_of(e) for e in held_out}
    data = spec.data
    train_task = make_task(data.task, data.task_kwargs, tokenizer)
    training = [e for e in train_task.examples(data.n_train + data.n_eval, data.seed) if question_of(e) not in scored]
    return task, held_out, training


def _run_depths(model, tokenizer, task, examples, batch_size: int) -> dict:
    from graftlm.adapters.sst_deliberation import collect_depth_labels

    prompts = [e.prompt for e in examples]

    def is_correct(i: int, text: str) -> bool:
        return task.is_correct(task.extract_answer(text), examples[i].answer)

    return collect_depth_labels(model, tokenizer, prompts, is_correct, task.max_new_tokens, batch_size)


def _accuracy_row(name: str, correct: list[bool], reference: list[bool] | None) -> dict:
    from graftlm.compare.stats import mcnemar_exact, wilson_interval

    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    row = {"row": name, "n": n, "correct": k, "accuracy": k / n, "low": low, "high": high}
    if reference is not None:
        test = mcnemar_exact(reference, correct)
        row.update({"vs_depth1": (k - sum(reference)) / n, "p": test["p"], "only_this": test["only_other"],
                    "only_depth1": test["only_reference"]})
    return row


def _blend_summary(graft) -> list[dict]:
    with torch.no_grad():
        gates, c = graft.gates().tolist(), graft.blend_coefficients().mean(-1).tolist()
    return [{"layer": layer, "gate": g, "mean_c": m} for layer, g, m in zip(graft.layer_indices, gates, c)]


def measure(spec_path: str, system: str, compare_dir: str | None, seed: int, n_probe: int, batch_size: int,
            limit: int | None = None) -> dict:
    from graftlm.adapters import attach_adapter
    from graftlm.adapters.sst_deliberation import fit_halting_probe, probe_depths, sst_graft_of
    from graftlm.compare.runner import load_base
    from graftlm.compare.spec import load_compare_spec

    spec = load_compare_spec(spec_path)
    adapter = Path(compare_dir or spec.output_dir) / spec.system(system).slug / f"seed{seed}" / "run" / "adapter"
    if not adapter.is_dir():
        raise SystemExit(f"no adapter at {adapter}: run `graftlm compare {spec_path}` first")
    base, tokenizer = load_base(spec)
    model = attach_adapter(base, str(adapter))
    model.eval()
    graft = sst_graft_of(model)
    task, held_out, training = _questions(spec, tokenizer)
    held_out = held_out[:limit]
    depths = list(range(1, graft.config.max_deliberation + 1))
    started = time.perf_counter()
    with graft.forward_mode("exact"):
        held = _run_depths(model, tokenizer, task, held_out, batch_size)
        probe_set = _run_depths(model, tokenizer, task, training[:n_probe], batch_size)
        saved = graft.gate_unfolded.detach().clone()
        with torch.no_grad():
            graft.gate_unfolded.zero_()  # the blend closed: the adapter's LoRA (if any) alone
        closed = _run_depths_at_one(model, tokenizer, task, held_out, batch_size)
        with torch.no_grad():
            graft.gate_unfolded.copy_(saved)
    wall = time.perf_counter() - started

    correct = held["correct"]  # [N, D]
    answers = [[task.normalize(task.extract_answer(text)) for text in row] for row in held["completions"]]
    first = correct[:, 0].tolist()
    rows = [_accuracy_row(f"depth {d}", correct[:, d - 1].tolist(), None if d == 1 else first) for d in depths]
    oracle = correct.any(1)
    rows.append(_accuracy_row("oracle (best depth per question)", oracle.tolist(), first))

    probe_accuracy = fit_halting_probe(graft, probe_set["features"], probe_set["labels"])
    chosen = probe_depths(graft, held["features"])
    probe_correct = correct[torch.arange(len(chosen)), chosen - 1].tolist()
    rows.append(_accuracy_row("probe-chosen depth", probe_correct, first))
    rows.append(_accuracy_row("blend closed (gates 0), depth 1", closed, first))

    changed_answer = sum(len(set(row)) > 1 for row in answers) / len(answers)
    changed_correct = float((correct.any(1) & ~correct.all(1)).float().mean())
    smallest = torch.where(oracle, correct.float().argmax(1) + 1, torch.zeros_like(chosen))
    margins = held["first_margin"][:, 0].tolist()
    shifts = held["first_shift"][:, 1:].amax(1).tolist()
    return {
        "spec": spec_path, "system": system, "seed": seed, "adapter": str(adapter), "n_held_out": len(held_out),
        "n_probe": len(probe_set["labels"]), "depths": depths, "rows": rows,
        "answer_changes_between_depths": changed_answer, "correctness_changes_between_depths": changed_correct,
        "oracle_smallest_depth_counts": {str(d): int((smallest == d).sum()) for d in [0, *depths]},
        "probe": {"train_accuracy": probe_accuracy,
                  "train_label_counts": {str(d): int((probe_set["labels"] == d).sum()) for d in depths},
                  "train_any_depth_correct": float(probe_set["correct"].any(1).float().mean()),
                  "chosen_depth_counts": {str(d): int((chosen == d).sum()) for d in depths}},
        "first_token": {"median_margin": statistics.median(margins),
                        "median_largest_shift_depths_2_to_4": statistics.median(shifts),
                        "max_largest_shift_depths_2_to_4": max(shifts),
                        "fraction_shift_above_margin": sum(s > m for s, m in zip(shifts, margins)) / len(margins)},
        "blend": _blend_summary(graft),
        "records": [{"question": e.meta.get("question"), "answer": e.answer, "completions": held["completions"][i],
                     "correct": correct[i].tolist(), "probe_depth": int(chosen[i]), "blend_closed_correct": closed[i]}
                    for i, e in enumerate(held_out)],
        "wall_s": round(wall, 1),
    }


def _run_depths_at_one(model, tokenizer, task, examples, batch_size: int) -> list[bool]:
    from graftlm.adapters.sst_deliberation import generate_with_deliberation

    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            encoded = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True)
            result = generate_with_deliberation(model, encoded.input_ids, encoded.attention_mask, task.max_new_tokens,
                                                1, tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(result.sequences[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
            out += [task.is_correct(task.extract_answer(t), e.answer) for t, e in zip(texts, chunk)]
    finally:
        tokenizer.padding_side = padding_side
    return out


def markdown(result: dict, command: str) -> str:
    lines = [f"## SST deliberation: {result['system']} (seed {result['seed']}), {result['spec']}", "",
             f"`{command}`", "",
             (f"{result['n_held_out']} held-out questions, exact prefill; probe fitted on {result['n_probe']} training "
             f"questions; {result['wall_s']:.0f} s."), "",
             "| row | accuracy | 95% interval | vs depth 1 | McNemar p | only this / only depth 1 |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        versus = (f"{100 * row['vs_depth1']:+.1f} pts | {row['p']:.3g} | {row['only_this']} / {row['only_depth1']}"
                  if "p" in row else "— | — | —")
        lines.append(f"| {row['row']} | {100 * row['accuracy']:.1f}% ({row['correct']}/{row['n']}) | "
                     f"[{100 * row['low']:.1f}, {100 * row['high']:.1f}] | {versus} |")
    probe, first = result["probe"], result["first_token"]
    lines += ["", (f"- Answer changes between depths 1..{len(result['depths'])}: "
                  f"{100 * result['answer_changes_between_depths']:.1f}% of questions; correctness changes: "
                  f"{100 * result['correctness_changes_between_depths']:.1f}%."),
              f"- Oracle smallest correct depth (0 = none): {result['oracle_smallest_depth_counts']}.",
              (f"- Probe: training labels {probe['train_label_counts']} (any depth correct on "
              f"{100 * probe['train_any_depth_correct']:.1f}% of training questions), training accuracy "
              f"{100 * probe['train_accuracy']:.1f}%; chosen depths on held-out {probe['chosen_depth_counts']}."),
              (f"- First answer token: median top-1/top-2 logit margin {first['median_margin']:.3f}; median largest "
              f"logit shift at depths 2..4 {first['median_largest_shift_depths_2_to_4']:.4f} (max "
              f"{first['max_largest_shift_depths_2_to_4']:.4f}); shift above the margin on "
              f"{100 * first['fraction_shift_above_margin']:.1f}% of questions."),
              "- Trained blend: gates " + ", ".join(f"L{b['layer']} {b['gate']:.2f}" for b in result["blend"]),
              "- Mean c = g a per layer: " + ", ".join(f"L{b['layer']} {b['mean_c']:.4f}" for b in result["blend"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the compare spec whose run saved the adapter")
    parser.add_argument("--system", required=True, help="the SST system's name in the spec")
    parser.add_argument("--compare-dir", help="the compare run's output directory (default: the spec's)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the adapter")
    parser.add_argument("--n-probe", type=int, default=300, help="training questions the probe is fitted on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N held-out questions (a smoke run; headline figures use all)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = measure(args.spec, args.system, args.compare_dir, args.seed, args.n_probe, args.batch_size, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deliberation.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result, "python3 " + " ".join(sys.argv))
    (out / "deliberation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
