"""``graftlm demo``: the main job, on an embedded real checkpoint, on a CPU in minutes.

1. Load the checkpoint (converted once from GGUF, then cached) and score the frozen base on a task with
   exact answers (greedy generation, exact match, held-out seed).
2. Attach a graft (SST by default), check that the fresh graft leaves the logits exactly unchanged,
   train it with the recipes loop, and score it again.
3. Train LoRA with the same trainable-parameter budget on the same data and steps, and score it: the
   baseline every graft is printed beside.
4. Save the graft, reload it onto a fresh copy of the base, and check identical logits and generations;
   detach and check the base is bit-identical.
5. When range-search attention is available: decode over a long real-text context, dense vs range
   search, with recall of the softmax mass and time per token.

Prints a short table; writes the adapter, ``report.json``, ``report.md`` and ``scores.png`` to ``out_dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

TASK = "basic_arithmetic"
TASK_KWARGS = {"difficulty": 1}
EVAL_SEED = 0  # the recipes train on data.seed 1: training and scored examples never overlap


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def score_task(model, tokenizer, n: int) -> dict[str, Any]:
    from graftlm.eval import evaluate

    return evaluate(model, tokenizer, TASK, TASK_KWARGS, n=n, seed=EVAL_SEED, batch_size=16, progress=False)


TRAINING_FIGURES = ("trainable_params", "final_loss", "final_eval_loss", "tokens_per_s", "wall_time_s")


def training_figures(run) -> dict[str, Any]:
    """The figures of a `train_graft` result that reports keep (``TRAINING_FIGURES`` of its summary)."""
    return {k: run.summary.get(k) for k in TRAINING_FIGURES}


def train_graft(model, tokenizer, graft: dict[str, Any], lr: float, steps: int, n_train: int, out_dir: Path, *,
                task: str = TASK, task_kwargs: dict[str, Any] | None = None, batch_size: int = 8,
                max_length: int = 256):
    """Train ``graft`` (a recipe's graft section) on ``model`` with the recipes loop on ``task`` (data seed
    1, 32 held-out examples for the eval loss); returns the loop's result (``.model``, ``.summary``)."""
    from graftlm.recipes.config import build_recipe
    from graftlm.recipes.loop import train

    recipe = build_recipe({
        "model": {"name": "unused: the loaded model is passed in"},
        "graft": graft,
        "data": {"task": task, "task_kwargs": dict(task_kwargs if task_kwargs is not None
                                                   else TASK_KWARGS if task == TASK else {}),
                 "n_train": n_train, "n_eval": 32, "seed": 1, "max_length": max_length},
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": max(1, steps // 10),
                  "schedule": "cosine", "eval_every": 0, "log_every": 5, "seed": 0, "progress_bar": True},
        "output_dir": str(out_dir),
    })
    return train(recipe, model=model, tokenizer=tokenizer)


def default_graft() -> tuple[dict[str, Any], float]:
    """The demo's graft spec and learning rate: SST when this build has it, else LoRA."""
    from graftlm.adapters import registered_graft_types

    if "sst" in registered_graft_types():
        return {"type": "sst"}, 3e-2
    return {"type": "lora", "r": 1, "target_modules": ["v_proj"]}, 1e-3


def run_demo(model_name: str = "smollm2-135m", out_dir: str | Path = "out/demo", quick: bool = False,
             steps: int | None = None, n_eval: int | None = None, baseline: bool = True) -> dict:
    import graftlm
    from graftlm import attach_adapter, load_model
    from graftlm.recipes.budget import lora_rank_for_budget

    out_dir = Path(out_dir)
    steps = steps or (6 if quick else 60)
    n_eval = n_eval or (16 if quick else 64)
    n_train = max(64, steps * 8)
    rows: list[tuple[str, str]] = []
    scores: dict[str, dict] = {}
    started = time.perf_counter()

    (model, tokenizer), load_s = _timed(lambda: load_model(model_name))
    rows.append((f"load {model_name}", f"{load_s:.1f} s"))
    scores["frozen base"] = score_task(model, tokenizer, n_eval)

    graft_spec, lr = default_graft()
    graft_type = graft_spec["type"]
    result, train_s = _timed(lambda: train_graft(model, tokenizer, graft_spec, lr, steps, n_train, out_dir / graft_type))
    graft_model = result.model
    summary = result.summary
    rows.append((f"{graft_type}: trainable / total params",
                 f"{summary['trainable_params']:,} / {summary['total_params']:,}"))
    rows.append((f"{graft_type}: train {steps} steps", _train_row(summary, train_s)))
    scores[graft_type] = score_task(graft_model, tokenizer, n_eval)

    if baseline:
        base_for_lora, _ = load_model(model_name)
        rank = lora_rank_for_budget(base_for_lora, summary["trainable_params"], ["v_proj"])
        lora_spec = {"type": "lora", "r": rank, "target_modules": ["v_proj"]}
        lora_result, lora_s = _timed(
            lambda: train_graft(base_for_lora, tokenizer, lora_spec, 1e-3, steps, n_train, out_dir / "lora"))
        rows.append(("LoRA same budget: trainable params",
                     f"{lora_result.summary['trainable_params']:,} (r={rank}, v_proj)"))
        rows.append(("LoRA same budget: train", _train_row(lora_result.summary, lora_s)))
        scores["LoRA, same budget"] = score_task(lora_result.model, tokenizer, n_eval)
        del base_for_lora, lora_result

    for label, score in scores.items():
        rows.append((f"{TASK} accuracy: {label}", f"{score['accuracy']:.3f} ({score['num_correct']}/{score['n']})"))

    ids = tokenizer("Question: 12 + 7 = ?\nAnswer:", return_tensors="pt").input_ids
    adapter_dir = out_dir / "adapter"
    graft_model.save_pretrained(adapter_dir, overwrite=True)
    size_kb = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file()) / 1024
    rows.append(("adapter saved", f"{adapter_dir} ({size_kb:.0f} KiB)"))
    expected = _logits(graft_model, ids)
    fresh, _ = load_model(model_name)
    fresh_logits = _logits(fresh, ids)
    reloaded = attach_adapter(fresh, adapter_dir)
    reload_exact = torch.equal(_logits(reloaded, ids), expected)
    reloaded_score = score_task(reloaded, tokenizer, n_eval)
    same_outputs = [r["completion"] for r in reloaded_score["records"]] == [
        r["completion"] for r in scores[graft_type]["records"]]
    rows.append(("reloaded adapter: logits identical", str(reload_exact)))
    rows.append(("reloaded adapter: generations identical", str(same_outputs)))
    detach_exact = torch.equal(_logits(reloaded.detach(), ids), fresh_logits)
    rows.append(("detach: base logits bit-identical", str(detach_exact)))
    del reloaded, fresh

    range_rows = _range_search_section(graft_model.detach(), tokenizer, quick)
    rows += range_rows

    wall = time.perf_counter() - started
    rows.append(("wall time", f"{wall:.0f} s"))
    ok = reload_exact and same_outputs and detach_exact
    report = {"model": model_name, "graftlm_version": graftlm.__version__, "task": TASK, "task_kwargs": TASK_KWARGS,
              "graft": graft_type, "steps": steps, "n_eval": n_eval, "rows": rows, "ok": ok, "wall_s": round(wall, 1),
              "scores": {k: {kk: v[kk] for kk in ("accuracy", "num_correct", "n")} for k, v in scores.items()}}
    _write_report(out_dir, report, scores)
    _print_table(report)
    return report


def _train_row(summary: dict, seconds: float) -> str:
    eval_loss = summary.get("final_eval_loss")
    return (f"{seconds:.0f} s, {summary['tokens_per_s']:.0f} tokens/s, final loss {summary['final_loss']:.3f}"
            + (f", held-out loss {eval_loss:.3f}" if eval_loss is not None else ""))


def _range_search_section(base_model, tokenizer, quick: bool) -> list[tuple[str, str]]:
    """Dense vs range-search decode on a long real-text context, when that graft is available."""
    from graftlm.adapters import registered_graft_types

    if "range_search" not in registered_graft_types():
        return [("range-search attention", "not available in this build")]
    from graftlm.demo_range_search import compare_range_search

    return compare_range_search(base_model, tokenizer, context_tokens=512 if quick else 2048)


def _print_table(report: dict) -> None:
    width = max(len(k) for k, _ in report["rows"])
    print(f"\ngraftlm demo: {report['graft']} on {report['model']}, task {report['task']} {report['task_kwargs']}")
    for key, value in report["rows"]:
        print(f"  {key:<{width}}  {value}")
    print("  result: " + ("OK" if report["ok"] else "FAILED"))


def _write_report(out_dir: Path, report: dict, scores: dict[str, dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# graftlm demo: {report['graft']} on {report['model']}", "",
             f"Task: `{report['task']}` {report['task_kwargs']}, {report['n_eval']} held-out examples, greedy, exact match.",
             "", "| step | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["rows"]]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plot_scores(out_dir / "scores.png", report, scores)


def _plot_scores(path: Path, report: dict, scores: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(scores)
    values = [scores[k]["accuracy"] for k in labels]
    fig, ax = plt.subplots(figsize=(5, 3))
    bars = ax.bar(labels, values, color=["#999999", "#2a7ab9", "#e07b39"][: len(labels)])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values])
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"{report['task']} on {report['model']} ({report['n_eval']} held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
