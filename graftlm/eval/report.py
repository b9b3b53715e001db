"""Reports of evaluation results: JSON, markdown tables, and PNG plots of sweeps (systems side by side).

A *result* is what ``runner.evaluate`` returns; a *sweep* is what ``runner.sweep`` returns (it has
``param``, ``values`` and ``accuracies``). *Systems* map a label ("frozen base", "LoRA same budget",
"graft") to results or sweeps of the same task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def is_sweep(result: Mapping[str, Any]) -> bool:
    """Returns whether ``result`` is a sweep rather than a single evaluation."""
    return "param" in result and "points" in result


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def markdown_table(result: Mapping[str, Any]) -> str:
    """Returns a markdown table of one result (with its per-group breakdowns) or of one sweep."""
    if is_sweep(result):
        lines = [f"**{result['task']}** ({_format_params(result['task_kwargs'])}), sweep over `{result['param']}`",
                 "", f"| {result['param']} | accuracy | correct / n |", "|---|---|---|"]
        for value, point in zip(result["values"], result["points"]):
            lines.append(f"| {value} | {point['accuracy']:.3f} | {point['num_correct']} / {point['n']} |")
        return "\n".join(lines) + "\n"
    row = f"| {result['task']} | {_format_params(result['task_kwargs'])} | {result['n']} | {result['accuracy']:.3f} |"
    lines = ["| task | parameters | n | accuracy |", "|---|---|---|---|", row]
    for key, groups in result.get("breakdown", {}).items():
        lines += ["", f"| {key} | accuracy |", "|---|---|"]
        lines += [f"| {value} | {acc:.3f} |" for value, acc in groups.items()]
    return "\n".join(lines) + "\n"


def comparison_table(systems: Mapping[str, Mapping[str, Any]]) -> str:
    """Returns a markdown table with one column per system: rows are sweep values (for sweeps) or tasks."""
    labels = list(systems)
    header = "| {} | {} |".format("{}", " | ".join(labels))
    rule = "|---" * (len(labels) + 1) + "|"
    first = next(iter(systems.values()))
    if is_sweep(first):
        lines = [header.format(first["param"]), rule]
        for index, value in enumerate(first["values"]):
            cells = [f"{systems[label]['accuracies'][index]:.3f}" for label in labels]
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
    else:
        lines = [header.format("task"), rule,
                 f"| {first['task']} ({_format_params(first['task_kwargs'])}) | "
                 + " | ".join(f"{systems[label]['accuracy']:.3f}" for label in labels) + " |"]
    return "\n".join(lines) + "\n"


def plot_sweeps(panels: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str) -> str:
    """Draws one panel per entry of ``panels`` side by side, each with one accuracy line per system
    (``panels[title][system] = sweep``); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for axis, (title, systems) in zip(axes[0], panels.items()):
        param = None
        for label, sweep in systems.items():
            param = sweep["param"]
            positions = range(len(sweep["values"]))
            axis.plot(positions, sweep["accuracies"], marker="o", label=label)
            axis.set_xticks(list(positions), [str(v) for v in sweep["values"]])
        axis.set_title(title)
        axis.set_xlabel(param or "")
        axis.set_ylabel("exact-match accuracy")
        axis.set_ylim(-0.03, 1.03)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _sweep_title(sweep: Mapping[str, Any]) -> str:
    return f"{sweep['task']}: accuracy vs {sweep['param']}"


def write_report(result: Mapping[str, Any], out_dir: str, name: str = "eval", label: str = "model") -> dict[str, str]:
    """Writes ``name``.json and ``name``.md (and ``name``.png for a sweep) under ``out_dir``; returns
    their paths by kind ("json", "markdown", "png")."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    with open(paths["markdown"], "w") as handle:
        handle.write(f"# {label}\n\n" + markdown_table(result))
    if is_sweep(result):
        paths["png"] = plot_sweeps({_sweep_title(result): {label: result}}, os.path.join(out_dir, f"{name}.png"))
    return paths


def write_comparison(systems: Mapping[str, Mapping[str, Any]], out_dir: str, name: str = "comparison") -> dict[str, str]:
    """Writes the systems' results side by side: ``name``.json, ``name``.md, and for sweeps ``name``.png
    with one line per system; returns the paths by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as handle:
        json.dump(dict(systems), handle, indent=2, default=str)
    with open(paths["markdown"], "w") as handle:
        handle.write(comparison_table(systems))
    first = next(iter(systems.values()))
    if is_sweep(first):
        paths["png"] = plot_sweeps({_sweep_title(first): systems}, os.path.join(out_dir, f"{name}.png"))
    return paths
