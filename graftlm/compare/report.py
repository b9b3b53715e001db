"""The compare report: per evaluation, one row per system (and variant) with intervals and paired tests.

Task evaluations: exact-match accuracy with a 95% interval (Wilson for one training seed; a bootstrap
over questions of the per-question mean over seeds for several), the paired difference from the
reference (bootstrap interval), its p-value (exact McNemar when both sides have one seed, else the
paired bootstrap's), and the mean answer-token NLL. Perplexity evaluations: perplexity with a bootstrap
interval over text blocks and the paired difference in NLL. Written as ``report.json``, ``report.md`` and
``report.png`` (accuracy / perplexity with error bars).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from graftlm.compare.spec import CompareSpec
from graftlm.compare.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap, wilson_interval

SIGNIFICANCE = 0.05


def machine_description() -> str:
    """The machine a report was measured on, in words (CPU cores, GPU if any)."""
    import torch

    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU, {cpu}"
    return f"{cpu}, no GPU"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _columns(rows: list[list[float]]) -> list[float]:
    """Per example, the mean over seeds (rows are seeds)."""
    return [_mean(column) for column in zip(*rows)]


def _rows_of(records: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """row name -> eval name -> per-seed results, for systems and their variants."""
    rows: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in sorted(records, key=lambda r: (r["seed"] is not None, r["seed"] or 0)):
        for name, result in record["evals"].items():
            rows[record["system"]][name].append(result)
        for variant, results in record.get("variants", {}).items():
            for name, result in results.items():
                rows[f"{record['system']} [{variant}]"][name].append(result)
    return rows


def _task_row(results: list[dict], reference: list[dict] | None) -> dict[str, Any]:
    correct = [[float(c) for c in r["correct"]] for r in results]
    per_question = _columns(correct)
    n, seeds = len(per_question), len(results)
    accuracy = _mean(per_question)
    if seeds == 1:
        low, high = wilson_interval(sum(results[0]["correct"]), n)
    else:
        low, high = bootstrap_interval(per_question)
    nll = _columns([r["answer_nll"] for r in results])
    row = {"n": n, "seeds": seeds, "accuracy": accuracy, "ci": [low, high],
           "per_seed_accuracy": [r["accuracy"] for r in results], "answer_nll": _mean(nll),
           "answer_nll_ci": list(bootstrap_interval(nll))}
    if reference is not None:
        reference_pq = _columns([[float(c) for c in r["correct"]] for r in reference])
        if len(reference_pq) != n:
            raise ValueError(f"paired results over different examples: {len(reference_pq)} and {n}")
        difference = paired_bootstrap(reference_pq, per_question)
        row["vs_reference"] = {"difference": difference["mean"], "ci": [difference["low"], difference["high"]]}
        if seeds == 1 and len(reference) == 1:
            test = mcnemar_exact(reference[0]["correct"], results[0]["correct"])
            row["vs_reference"].update(p=test["p"], test="exact McNemar", only_this=test["only_other"],
                                       only_reference=test["only_reference"])
        else:
            row["vs_reference"].update(p=difference["p"], test="paired bootstrap over questions (seed means)")
    return row


def _perplexity_row(results: list[dict], reference: list[dict] | None) -> dict[str, Any]:
    nll = _columns([r["block_nll"] for r in results])
    low, high = bootstrap_interval(nll)
    row = {"n": len(nll), "seeds": len(results), "perplexity": math.exp(_mean(nll)),
           "ci": [math.exp(low), math.exp(high)], "per_seed_perplexity": [r["perplexity"] for r in results],
           "nll": _mean(nll)}
    if reference is not None:
        difference = paired_bootstrap(_columns([r["block_nll"] for r in reference]), nll)
        row["vs_reference"] = {"difference_nll": difference["mean"], "ci": [difference["low"], difference["high"]],
                               "p": difference["p"], "test": "paired bootstrap over text blocks"}
    return row


def build_report(spec: CompareSpec, records: list[dict], data_info: dict[str, Any], wall_s: float = 0.0,
                 command: str | None = None) -> dict[str, Any]:
    """The report of a compare run from its per-(system, seed) records."""
    rows = _rows_of(records)
    reference_name = spec.reference
    training: dict[str, list[dict[str, Any]]] = {}
    params = {record["system"]: record.get("trainable_params", 0) for record in records}
    for record in records:
        if record.get("training"):
            training.setdefault(record["system"], []).append(record["training"])
    tables: dict[str, list[dict[str, Any]]] = {}
    for eval_spec in spec.evals:
        reference = rows.get(reference_name, {}).get(eval_spec.name)
        table = []
        for name, per_eval in rows.items():
            results = per_eval.get(eval_spec.name)
            if not results:
                continue
            other = None if name == reference_name else reference
            row = _task_row(results, other) if eval_spec.kind == "task" else _perplexity_row(results, other)
            system = name.split(" [", 1)[0]
            runs = training.get(system, [])
            row.update(system=name, reference=name == reference_name,
                       trainable_params=params.get(system, 0),
                       final_loss=_mean(r["final_loss"] for r in runs) if runs else None,
                       tokens_per_s=_mean(r["tokens_per_s"] for r in runs) if runs else None,
                       train_wall_s=_mean(r["wall_time_s"] for r in runs) if runs else None)
            table.append(row)
        tables[eval_spec.name] = table
    pairs: dict[str, list[dict[str, Any]]] = {}
    for eval_spec in spec.evals:
        pairs[eval_spec.name] = []
        for first, second in spec.pairs:
            a, b = rows.get(first, {}).get(eval_spec.name), rows.get(second, {}).get(eval_spec.name)
            if not a or not b:
                continue
            row = _task_row(a, b) if eval_spec.kind == "task" else _perplexity_row(a, b)
            pairs[eval_spec.name].append({"system": first, "versus": second, **row["vs_reference"]})
    return {
        "name": spec.name, "description": spec.description, "command": command, "model": spec.raw.get("model"),
        "data": spec.raw.get("data"), "train": spec.train, "seeds": spec.seeds, "reference": reference_name,
        "evals": [{"name": e.name, "kind": e.kind, "task": e.task, "task_kwargs": e.task_kwargs, "n": e.n,
                   "seed": e.seed} for e in spec.evals],
        "data_info": data_info, "tables": tables, "pairs": pairs, "records": records,
        "date": time.strftime("%Y-%m-%d"), "machine": machine_description(), "wall_s": round(wall_s, 1),
    }


def _interval(low: float, high: float, digits: int = 3) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _p(row: dict) -> str:
    versus = row.get("vs_reference")
    if versus is None:
        return "reference"
    mark = " *" if versus["p"] < SIGNIFICANCE else ""
    return f"{versus['p']:.3g}{mark}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header of what was run, then one table per evaluation."""
    train = report["train"]
    data = report["data"] or {}
    source = data.get("task") or data.get("dataset")
    lines = [f"## {report['name']}", ""]
    if report.get("description"):
        lines += [report["description"].strip(), ""]
    lines += [(f"Model `{(report['model'] or {}).get('name')}`; training data {source} "
              f"{data.get('task_kwargs') or ''} ({report['data_info']['train_examples']} examples, "
              f"{report['data_info']['dropped_as_eval_overlap']} dropped as overlap with the held-out questions); "
              f"{train.get('steps')} steps, batch {train.get('batch_size', 8)}, training seeds {report['seeds']}; "
              f"reference **{report['reference']}**. {report['date']}, {report['machine']}, "
              f"{report['wall_s'] / 60:.0f} min in all.")]
    if report.get("command"):
        lines += ["", f"    {report['command']}"]
    for eval_info in report["evals"]:
        table = report["tables"][eval_info["name"]]
        lines += ["", (f"**{eval_info['name']}** ({eval_info['n']} held-out, seed {eval_info['seed']}; "
                      "95% intervals; p: paired test against the reference, * below 0.05)"), ""]
        if eval_info["kind"] == "task":
            lines += [("| system | trainable | accuracy [95% CI] | vs reference [95% CI] | p | answer NLL | "
                      "train tok/s | train s |"), "|---|---|---|---|---|---|---|---|"]
            for row in table:
                versus = row.get("vs_reference")
                delta = (f"{versus['difference']:+.3f} {_interval(*versus['ci'])}" if versus else "-")
                seeds = f" (seeds: {', '.join(f'{a:.3f}' for a in row['per_seed_accuracy'])})" if row["seeds"] > 1 else ""
                lines.append(
                    f"| {row['system']} | {row['trainable_params']:,} | {row['accuracy']:.3f} {_interval(*row['ci'])}"
                    f"{seeds} | {delta} | {_p(row)} | {row['answer_nll']:.3f} | "
                    f"{_fmt(row['tokens_per_s'], '.0f')} | {_fmt(row['train_wall_s'], '.0f')} |")
        else:
            lines += ["| system | trainable | perplexity [95% CI] | NLL vs reference [95% CI] | p |",
                      "|---|---|---|---|---|"]
            for row in table:
                versus = row.get("vs_reference")
                delta = f"{versus['difference_nll']:+.4f} {_interval(*versus['ci'], 4)}" if versus else "-"
                lines.append(f"| {row['system']} | {row['trainable_params']:,} | {row['perplexity']:.3f} "
                             f"{_interval(*row['ci'], 2)} | {delta} | {_p(row)} |")
        paired = report.get("pairs", {}).get(eval_info["name"])
        if paired:
            key = "difference" if eval_info["kind"] == "task" else "difference_nll"
            lines += ["", "| paired comparison | difference [95% CI] | p | test |", "|---|---|---|---|"]
            for row in paired:
                mark = " *" if row["p"] < SIGNIFICANCE else ""
                lines.append(f"| {row['system']} vs {row['versus']} | {row[key]:+.3f} {_interval(*row['ci'])} | "
                             f"{row['p']:.3g}{mark} | {row['test']} |")
    lines += ["", verdicts(report)]
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verdicts(report: dict[str, Any]) -> str:
    """One sentence per evaluation naming the significant differences: from the reference, and in pairs."""
    sentences = []
    for eval_info in report["evals"]:
        key = "difference" if eval_info["kind"] == "task" else "difference_nll"
        found = [f"{row['system']} vs {report['reference']} ({row['vs_reference'][key]:+.3f}, "
                 f"p={row['vs_reference']['p']:.2g})"
                 for row in report["tables"][eval_info["name"]]
                 if row.get("vs_reference") and row["vs_reference"]["p"] < SIGNIFICANCE]
        found += [f"{row['system']} vs {row['versus']} ({row[key]:+.3f}, p={row['p']:.2g})"
                  for row in report.get("pairs", {}).get(eval_info["name"], []) if row["p"] < SIGNIFICANCE]
        what = "accuracy" if eval_info["kind"] == "task" else "NLL"
        sentences.append(f"{eval_info['name']}: " + (f"significant {what} differences: " + "; ".join(found)
                                                     if found else "no difference is significant") + ".")
    return "Verdict (p < 0.05): " + " ".join(sentences)


def plot(report: dict[str, Any], path: str | Path) -> str:
    """One panel per evaluation: the metric per system with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = report["evals"]
    figure, axes = plt.subplots(1, len(evals), figsize=(max(5.0, 1.1 * max(len(report["tables"][e["name"]])
                                                                            for e in evals)) * len(evals), 4.2),
                                squeeze=False)
    for axis, eval_info in zip(axes[0], evals):
        table = report["tables"][eval_info["name"]]
        metric = "accuracy" if eval_info["kind"] == "task" else "perplexity"
        values = [row[metric] for row in table]
        errors = [[max(0.0, v - row["ci"][0]) for v, row in zip(values, table)],
                  [max(0.0, row["ci"][1] - v) for v, row in zip(values, table)]]
        colours = ["#555555" if row["reference"] else "#2a7ab9" for row in table]
        axis.bar(range(len(table)), values, yerr=errors, capsize=4, color=colours)
        axis.set_xticks(range(len(table)), [row["system"] for row in table], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(f"{metric} (95% CI)")
        axis.set_title(f"{eval_info['name']} (n={eval_info['n']})", fontsize=9)
        if metric == "accuracy":
            axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(report["name"], fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """``report.json``, ``report.md`` and ``report.png`` under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "png": str(out / "report.png")}
    Path(paths["json"]).write_text(json.dumps(report, indent=2, default=str) + "\n")
    Path(paths["markdown"]).write_text(markdown(report))
    plot(report, paths["png"])
    return paths
