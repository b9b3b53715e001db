"""`run_compare`: train every system of a `CompareSpec` on the same data, score them on the same held-out
examples, and write the side-by-side report.

One process, one system at a time (a fresh copy of the base each), in the spec's order:

1. The evaluation examples are built once; training examples whose question is also a held-out question
   are dropped (and counted), so no system is scored on what it trained on.
2. Each trained system runs the recipes loop (`graftlm.recipes.loop.train`) with the shared data, steps,
   batch and seed; ``budget_of`` sizes a LoRA to another system's trainable-parameter count first.
3. Each system (and each of its ``variants``: graft config fields set at evaluation only) is scored on
   every evaluation; per-example scores are kept so the report can pair them.

Every finished (system, seed) is written to ``<out>/<system>/seed<k>/result.json`` at once; ``resume=True``
reuses those whose spec fingerprint matches, so a long run that stops can go on where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from graftlm.compare.evaluation import EvalSet, build_eval_set, measure, question_of
from graftlm.compare.spec import CompareSpec, SystemSpec
from graftlm.recipes.config import RecipeError


def load_base(spec: CompareSpec):
    from graftlm.models import load_model

    return load_model(spec.model.name, dtype=spec.model.dtype, attn_implementation=spec.model.attn_implementation)


def training_texts(spec: CompareSpec, tokenizer: Any, eval_sets: Sequence[EvalSet]):
    """(train texts, held-out texts for the eval loss, number of training examples dropped as overlap).
    The overlap check applies to a task as the main source; ``data.mix`` sources are appended as they are."""
    from graftlm.recipes.sources import load_mixed_data, load_training_data, make_task, task_texts

    data = spec.data
    if data.task is None:
        train, held_out = load_training_data(data, tokenizer)
        return train, held_out, 0
    task = make_task(data.task, data.task_kwargs, tokenizer)
    examples = list(task.examples(data.n_train + data.n_eval, data.seed))
    scored = set().union(*(s.questions for s in eval_sets)) if eval_sets else set()
    kept = [e for e in examples if question_of(e) not in scored]
    split = len(kept) - min(data.n_eval, len(kept))
    if split < 1:
        raise RecipeError(f"data: every training example of task {data.task!r} is also a held-out question")
    mixed_train, mixed_held_out = load_mixed_data(data, tokenizer)
    return (task_texts(task, kept[:split], data.answer_end) + mixed_train,
            task_texts(task, kept[split:], data.answer_end) + mixed_held_out, len(examples) - len(kept))


def trainable_count(spec: CompareSpec, system: SystemSpec, base) -> int:
    """The trainable-parameter count of ``system``'s grafts on ``base`` (attached, counted, detached)."""
    from graftlm.recipes.loop import attach_grafts

    graft_model = attach_grafts(base, spec.recipe(system, spec.seeds[0], "unused"))
    try:
        return sum(p.numel() for p in graft_model.graft_parameters())
    finally:
        graft_model.detach()


def resolved_grafts(spec: CompareSpec, system: SystemSpec, base) -> list[dict[str, Any]]:
    """The system's graft list, its ``budget_of`` LoRA given the rank that brings the system's trainable count
    (its other grafts' included) closest to the target's."""
    from graftlm.compare.spec import with_lora_rank
    from graftlm.recipes.budget import lora_params_per_rank, lora_rank_for_budget

    if system.budget_of is None:
        return copy.deepcopy(system.grafts)
    budget = trainable_count(spec, spec.system(system.budget_of), base)
    lora = next(g for g in system.grafts if g.get("type") == "lora")
    where = (lora.get("target_modules"), lora.get("target_layers"))
    at_rank_one = SystemSpec(system.name, with_lora_rank(system.grafts, 1), train=system.train)
    others = trainable_count(spec, at_rank_one, base) - lora_params_per_rank(base, *where)
    return with_lora_rank(system.grafts, lora_rank_for_budget(base, max(1, budget - others), *where))


@contextlib.contextmanager
def config_overrides(graft_model, fields: dict[str, Any]) -> Iterator[None]:
    """Set graft config fields for the block (an evaluation variant) on every graft that has them."""
    if not fields:
        yield
        return
    claimed = set()
    stack = contextlib.ExitStack()
    with stack:
        for graft in graft_model.grafts.values():
            mine = {k: v for k, v in fields.items() if hasattr(graft.config, k)}
            if mine:
                stack.enter_context(graft.config_overrides(mine))
                claimed |= set(mine)
        unknown = sorted(set(fields) - claimed)
        if unknown:
            raise RecipeError(f"variant fields {unknown} are not config fields of any graft of this system")
        yield


def fingerprint(spec: CompareSpec, system: SystemSpec, seed: int | None) -> str:
    """A hash of everything that determines a (system, seed) result."""
    raw = spec.raw
    parts = {"model": raw.get("model"), "data": raw.get("data") if system.trained else None,
             "train": raw.get("train") if system.trained else None,
             "evals": raw.get("evals"), "system": next((s for s in raw["systems"] if s.get("name") == system.name),
                                                        None), "seed": seed}
    if system.budget_of is not None:
        parts["budget_of"] = next((s for s in raw["systems"] if s.get("name") == system.budget_of), None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_system(spec: CompareSpec, system: SystemSpec, seed: int | None, eval_sets: Sequence[EvalSet],
               train_texts, held_texts, out: Path, progress: bool = True,
               on_model: Callable[[SystemSpec, Any, dict], None] | None = None) -> dict[str, Any]:
    """Train (when it has grafts) and score one system at one training seed; returns its result record.
    ``on_model(system, model, record)`` sees the trained model before it is freed (e.g. for extra checks)."""
    from graftlm.recipes.loop import train

    started = time.perf_counter()
    base, tokenizer = load_base(spec)
    record: dict[str, Any] = {"system": system.name, "seed": seed, "training": None}
    model = base
    if system.adapter is not None:
        from graftlm.adapters import attach_adapter

        model = attach_adapter(base, system.adapter)
        record["adapter_dir"] = system.adapter
        record["trainable_params"] = sum(p.numel() for g in model.grafts.values() for p in g.all_parameters())
    elif system.untrained:
        from graftlm.recipes.loop import attach_grafts

        model = attach_grafts(base, spec.recipe(system, spec.seeds[0], out / "run"))
        record["grafts"] = system.grafts
        record["trainable_params"] = sum(p.numel() for p in model.graft_parameters())
    elif system.trained:
        grafts = resolved_grafts(spec, system, base)
        recipe = spec.recipe(system, seed, out / "run", grafts)
        recipe.train.progress_bar = recipe.train.progress_bar and progress  # --no-progress: no training bar
        run = train(recipe, model=base, tokenizer=tokenizer, train_examples=train_texts, eval_examples=held_texts)
        model = run.model
        summary = run.summary
        record["grafts"] = grafts
        record["training"] = {k: summary.get(k) for k in ("trainable_params", "final_loss", "final_eval_loss",
                                                          "tokens_per_s", "wall_time_s", "train_examples", "steps")}
        record["adapter_dir"] = summary.get("adapter_dir")
    if record["training"]:
        record["trainable_params"] = record["training"]["trainable_params"]
    record.setdefault("trainable_params", 0)
    record["evals"] = {s.spec.name: measure(model, tokenizer, s, progress) for s in eval_sets}
    record["variants"] = {}
    for name, fields in system.variants.items():
        with config_overrides(model, fields):
            record["variants"][name] = {s.spec.name: measure(model, tokenizer, s, progress) for s in eval_sets}
    record["wall_s"] = time.perf_counter() - started
    if on_model is not None:
        on_model(system, model, record)
    del model, base
    gc.collect()
    return record


def run_compare(spec: CompareSpec, out_dir: str | Path | None = None, resume: bool = False,
                only: Sequence[str] | None = None, progress: bool = True, command: str | None = None,
                on_model: Callable[[SystemSpec, Any, dict], None] | None = None) -> dict[str, Any]:
    """Run every system of ``spec`` (or those named in ``only``: the reference always runs too) and write
    the report (``command``: how to regenerate it, printed in the report); returns the report (see
    `graftlm.compare.report.build_report`). ``on_model``: see `run_system` (not called for resumed results)."""
    from graftlm.compare.report import build_report, write_report

    out = Path(out_dir or spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, tokenizer = load_base(spec)
    eval_sets = [build_eval_set(e, tokenizer) for e in spec.evals]
    train_texts, held_texts, dropped = training_texts(spec, tokenizer, eval_sets)
    names = set(only or [s.name for s in spec.systems]) | {spec.reference}
    unknown = names - {s.name for s in spec.systems}
    if unknown:
        raise RecipeError(f"no system named {sorted(unknown)}; systems: {', '.join(s.name for s in spec.systems)}")
    records, reused_s = [], 0.0
    for system in (s for s in spec.systems if s.name in names):
        for seed in (spec.seeds if system.trained else [None]):
            where = out / system.slug / (f"seed{seed}" if seed is not None else "untrained")
            path = where / "result.json"
            key = fingerprint(spec, system, seed)
            if resume and path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("fingerprint") == key:
                    print(f"[compare] {system.name} (seed {seed}): reusing {path}", flush=True)
                    records.append(saved)
                    reused_s += float(saved.get("wall_s") or 0.0)
                    continue
            print(f"[compare] {system.name} (seed {seed})", flush=True)
            record = run_system(spec, system, seed, eval_sets, train_texts, held_texts, where, progress, on_model)
            record["fingerprint"] = key
            where.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, default=str) + "\n")
            records.append(record)
    report = build_report(spec, records, {"train_examples": len(train_texts), "held_out_for_eval_loss":
                                          len(held_texts), "dropped_as_eval_overlap": dropped},
                          wall_s=time.perf_counter() - started + reused_s, command=command)
    write_report(report, out)
    return report
