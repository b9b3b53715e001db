"""`CompareSpec`: a side-by-side experiment as one YAML file, validated before anything is loaded.

    name: sst-vs-lora
    model: {name: smollm2-135m}
    data: {task: chain_sum, task_kwargs: {difficulty: 3}, n_train: 2400, n_eval: 32}   # training data
    train: {steps: 300, batch_size: 8, lr: 1.0e-3, warmup_steps: 30}                    # shared by every system
    evals:                                   # held-out scoring, the same examples for every system
      - {task: chain_sum, task_kwargs: {difficulty: 3}, n: 300, seed: 0}
      - {name: held-out text, perplexity: {dataset: text, data_files: [a.txt], text_field: text}, n: 200}
    seeds: [0]                               # training seeds (several when a difference is small)
    reference: LoRA r=8                      # the system every paired test compares with
    pairs: [[SST + LoRA r=8, LoRA r=8]]      # more paired tests (rows or "system [variant]" rows)
    systems:
      - {name: frozen base}                  # no graft: scored untrained
      - {name: LoRA r=8, graft: {type: lora, r: 8}}
      - name: SST + LoRA r=8
        graft: {type: sst, lora_r: 8}
        train: {lr: 3.0e-2}                  # optimisation settings only
      - name: LoRA, SST's budget
        graft: {type: lora, target_modules: [v_proj]}
        budget_of: SST + LoRA r=8            # the LoRA rank that brings the system's parameter count (its
                                             # other grafts' included) closest to that system's
      - name: attractor
        graft: {type: attractor}
        variants: {"1 iteration": {min_iter: 1, max_iter: 1}}   # extra rows: config fields set at eval
      - {name: window only, graft: {type: echo, mode: replace}, untrained: true}   # a fresh adapter, scored
      - {name: shipped SST, adapter: graftlm/demo_adapters/sst}     # a saved adapter (dir or Hub id), scored

Fairness is enforced: every system trains on the same data, steps, batch size, accumulation and seeds; a
system may change only optimisation settings (``SYSTEM_TRAIN_KEYS``). Every system's recipe is validated
here (graft configs included) so a bad spec fails before the first training run.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graftlm.recipes.config import (
    DataSection,
    ModelSection,
    Recipe,
    RecipeError,
    _build_section,
    _check_keys,
    _coerce,
    apply_overrides,
    build_recipe,
    parse_override_args,
)

TOP_LEVEL_KEYS = {"name", "description", "model", "data", "train", "evals", "seeds", "reference", "pairs",
                  "systems", "output_dir"}
SYSTEM_KEYS = {"name", "graft", "adapter", "train", "budget_of", "variants", "untrained"}
SYSTEM_TRAIN_KEYS = {"lr", "weight_decay", "optimizer", "adam_betas", "warmup_steps", "schedule", "max_grad_norm",
                     "gradient_checkpointing"}
EVAL_KEYS = {"name", "task", "task_kwargs", "perplexity", "n", "seed", "batch_size", "max_new_tokens",
             "max_length"}


@dataclass
class EvalSpec:
    """One held-out measurement: a generation task (exact-match accuracy and answer-token NLL) or the
    perplexity of plain text (``perplexity``: a data section with ``text_field``, cut into blocks)."""

    name: str
    task: str | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    perplexity: DataSection | None = None
    n: int = 200
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int | None = None
    max_length: int = 512

    @property
    def kind(self) -> str:
        return "task" if self.task is not None else "perplexity"


@dataclass
class SystemSpec:
    """One system: a name, its grafts (none: the frozen base), optimisation overrides, a budget match;
    ``untrained``: the grafts are attached fresh and scored without training (a control); ``adapter``: a
    saved adapter (directory or Hub id) attached and scored without training."""

    name: str
    grafts: list[dict[str, Any]] | None = None
    adapter: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    budget_of: str | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    untrained: bool = False

    @property
    def trained(self) -> bool:
        return self.grafts is not None and not self.untrained

    @property
    def grafted(self) -> bool:
        """Whether the system carries grafts when it is scored (trained, fresh or loaded)."""
        return self.grafts is not None or self.adapter is not None

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass
class CompareSpec:
    name: str
    model: ModelSection
    data: DataSection
    train: dict[str, Any]
    evals: list[EvalSpec]
    systems: list[SystemSpec]
    reference: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    description: str = ""
    output_dir: str = "out/compare"
    raw: dict[str, Any] = field(default_factory=dict)

    def system(self, name: str) -> SystemSpec:
        return next(s for s in self.systems if s.name == name)

    def recipe(self, system: SystemSpec, seed: int, output_dir: str | Path, grafts: list[dict] | None = None
               ) -> Recipe:
        """The validated recipe that trains ``system`` with training seed ``seed`` (``grafts`` replaces its
        graft list, e.g. with a LoRA rank resolved from a budget)."""
        return system_recipe(self.raw, system, seed, output_dir, grafts)


def system_recipe(raw: dict[str, Any], system: SystemSpec, seed: int, output_dir: str | Path,
                  grafts: list[dict] | None = None) -> Recipe:
    """The recipe of ``system`` from a raw spec: its grafts, the shared model / data / train sections with
    the system's optimisation overrides, and training seed ``seed``."""
    items = grafts if grafts is not None else system.grafts
    return build_recipe({"model": copy.deepcopy(raw["model"]), "graft": copy.deepcopy(items[0] if len(items) == 1
                                                                                      else items),
                         "data": copy.deepcopy(raw.get("data") or {}),
                         "train": {**copy.deepcopy(raw.get("train") or {}), **copy.deepcopy(system.train),
                                   "seed": seed},
                         "output_dir": str(output_dir)})


def output_dir_of(raw: dict[str, Any]) -> str:
    """Where a raw spec's run writes: its ``output_dir``, else out/compare/<slug of its name>."""
    return str(raw.get("output_dir", f"out/compare/{slugify(str(raw.get('name', 'compare')))}"))


def slugify(name: str) -> str:
    """A folder name for a system: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "system"


def load_compare_spec(path: str | Path, overrides: list[str] | None = None) -> CompareSpec:
    """Read a compare spec YAML, apply ``--key value`` overrides, validate; raises `RecipeError`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"compare spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"compare spec {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"compare spec {path} must be a YAML mapping, not {type(raw).__name__}")
    apply_overrides(raw, parse_override_args(overrides or []))
    try:
        return build_compare_spec(raw)
    except RecipeError as err:
        raise RecipeError(f"compare spec {path}: {err}") from None


def build_compare_spec(raw: dict[str, Any]) -> CompareSpec:
    """Validate a raw spec mapping into a `CompareSpec`, reporting every problem at once."""
    problems: list[str] = []
    _check_keys(raw, TOP_LEVEL_KEYS, "", problems)
    for key in ("name", "model", "data", "systems"):
        if key not in raw:
            problems.append(f"{key}: missing")
    name = _coerce(raw.get("name", "compare"), str, "name", problems)
    model = _build_section(ModelSection, raw.get("model"), "model", problems) if "model" in raw else None
    data = _build_section(DataSection, raw.get("data") or {}, "data", problems)
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        problems.append(f"train: must be a mapping, got {type(train).__name__}")
        train = {}
    seeds = _coerce(raw.get("seeds", [0]), list[int], "seeds", problems) or [0]
    if len(set(seeds)) != len(seeds):
        problems.append(f"seeds: {seeds} repeats a seed")
    systems = _build_systems(raw.get("systems"), problems)
    evals = _build_evals(raw.get("evals"), data, problems)
    names = [s.name for s in systems]
    reference = _coerce(raw.get("reference", next((s.name for s in systems if s.trained), names[0] if names else "")),
                        str, "reference", problems)
    if systems and reference not in names:
        problems.append(f"reference: {reference!r} is not a system; systems: {', '.join(names)}")
    pairs = _build_pairs(raw.get("pairs") or [], systems, problems)
    if model is not None and data is not None:
        _check_recipes(raw, systems, seeds[0], problems)
    if problems:
        raise RecipeError("bad compare spec:\n  " + "\n  ".join(problems))
    return CompareSpec(name=name, model=model, data=data, train=dict(train), evals=evals, systems=systems,
                       reference=reference, pairs=pairs, seeds=seeds, description=str(raw.get("description", "")),
                       output_dir=output_dir_of(raw), raw=raw)


def _build_systems(values: Any, problems: list[str]) -> list[SystemSpec]:
    if not isinstance(values, list) or not values:
        problems.append("systems: must be a non-empty list of mappings with a `name`")
        return []
    systems: list[SystemSpec] = []
    for index, item in enumerate(values):
        where = f"systems.{index}"
        if not isinstance(item, dict) or "name" not in item:
            problems.append(f"{where}: must be a mapping with a `name`")
            continue
        _check_keys(item, SYSTEM_KEYS, f"{where}.", problems)
        graft = item.get("graft")
        grafts = None if graft is None else (graft if isinstance(graft, list) else [graft])
        train = item.get("train") or {}
        if not isinstance(train, dict):
            problems.append(f"{where}.train: must be a mapping")
            train = {}
        for key in sorted(set(train) - SYSTEM_TRAIN_KEYS):
            problems.append(f"{where}.train.{key}: a system may change only optimisation settings "
                            f"({', '.join(sorted(SYSTEM_TRAIN_KEYS))}); data, steps, batch and seeds are shared")
        variants = item.get("variants") or {}
        if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
            problems.append(f"{where}.variants: must map a variant name to a mapping of config fields")
            variants = {}
        untrained = _coerce(item.get("untrained", False), bool, f"{where}.untrained", problems)
        adapter = _coerce(item.get("adapter"), str | None, f"{where}.adapter", problems)
        system = SystemSpec(name=str(item["name"]), grafts=grafts, adapter=adapter, train=dict(train),
                            budget_of=item.get("budget_of"), variants={str(k): dict(v) for k, v in variants.items()},
                            untrained=bool(untrained))
        if adapter is not None and grafts is not None:
            problems.append(f"{where}: give `graft` (trained here) or `adapter` (a saved one), not both")
        if untrained and grafts is None:
            problems.append(f"{where}.untrained: needs a graft to attach")
        if not system.trained and (system.train or system.budget_of):
            problems.append(f"{where}: an untrained system takes no train or budget_of")
        if not system.grafted and system.variants:
            problems.append(f"{where}.variants: a system without a graft has no config fields to vary")
        systems.append(system)
    names = [s.name for s in systems]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"systems: the name {name!r} is used twice")
    slugs = [s.slug for s in systems]
    for slug in {s for s in slugs if slugs.count(s) > 1}:
        problems.append(f"systems: two names make the same folder name {slug!r}; rename one")
    for system in systems:
        if system.budget_of is None:
            continue
        target = next((s for s in systems if s.name == system.budget_of), None)
        if target is None or not target.trained or target is system:
            problems.append(f"systems.{system.name}.budget_of: {system.budget_of!r} is not another trained system")
        loras = [g for g in system.grafts or [] if isinstance(g, dict) and g.get("type") == "lora"]
        if len(loras) != 1:
            problems.append(f"systems.{system.name}.budget_of: the system needs exactly one LoRA graft to size to "
                            f"the budget, it has {len(loras)}")
        elif "r" in loras[0]:
            problems.append(f"systems.{system.name}: give `r` or `budget_of`, not both")
    return systems


def with_lora_rank(grafts: list[Any], rank: int) -> list[Any]:
    """A copy of a graft list with rank ``rank`` set on its LoRA graft(s)."""
    return [{**g, "r": rank} if isinstance(g, dict) and g.get("type") == "lora" else copy.deepcopy(g)
            for g in grafts]


def _build_pairs(values: Any, systems: list[SystemSpec], problems: list[str]) -> list[tuple[str, str]]:
    rows = {s.name for s in systems} | {f"{s.name} [{v}]" for s in systems for v in s.variants}
    if not isinstance(values, list) or not all(isinstance(p, list) and len(p) == 2 for p in values):
        problems.append("pairs: must be a list of [system, other system] pairs")
        return []
    for first, second in values:
        for name in (first, second):
            if name not in rows:
                problems.append(f"pairs: {name!r} is not a system or 'system [variant]' row")
    return [(str(a), str(b)) for a, b in values]


def _build_evals(values: Any, data: DataSection | None, problems: list[str]) -> list[EvalSpec]:
    if values is None:
        if data is None or data.task is None:
            problems.append("evals: missing (the data is not a task, so there is no default evaluation)")
            return []
        values = [{"task": data.task, "task_kwargs": dict(data.task_kwargs)}]
    if not isinstance(values, list) or not values:
        problems.append("evals: must be a non-empty list of mappings")
        return []
    evals = []
    for index, item in enumerate(values):
        where = f"evals.{index}"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        _check_keys(item, EVAL_KEYS, f"{where}.", problems)
        if ("task" in item) == ("perplexity" in item):
            problems.append(f"{where}: give exactly one of `task` (accuracy) or `perplexity` (a text source)")
            continue
        perplexity = None
        if "perplexity" in item:
            perplexity = _build_section(DataSection, item["perplexity"], f"{where}.perplexity", problems)
            if perplexity is not None and (perplexity.dataset is None or perplexity.text_field is None):
                problems.append(f"{where}.perplexity: needs `dataset` and `text_field`")
        task_kwargs = _coerce(item.get("task_kwargs", {}), dict[str, Any], f"{where}.task_kwargs", problems) or {}
        default_name = item.get("task") or "perplexity"
        if task_kwargs:
            default_name += " (" + ", ".join(f"{k}={v}" for k, v in task_kwargs.items()) + ")"
        spec = EvalSpec(
            name=_coerce(item.get("name", default_name), str, f"{where}.name", problems),
            task=item.get("task"), task_kwargs=task_kwargs, perplexity=perplexity,
            n=_coerce(item.get("n", 200), int, f"{where}.n", problems),
            seed=_coerce(item.get("seed", 0), int, f"{where}.seed", problems),
            batch_size=_coerce(item.get("batch_size", 16), int, f"{where}.batch_size", problems),
            max_new_tokens=_coerce(item.get("max_new_tokens"), int | None, f"{where}.max_new_tokens", problems),
            max_length=_coerce(item.get("max_length", 512), int, f"{where}.max_length", problems),
        )
        for key in ("n", "batch_size", "max_length"):
            value = getattr(spec, key)
            if isinstance(value, int) and value < 1:
                problems.append(f"{where}.{key}: must be >= 1, got {value}")
        evals.append(spec)
    names = [e.name for e in evals]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"evals: the name {name!r} is used twice; give each a `name`")
    return evals


def _check_recipes(raw: dict[str, Any], systems: list[SystemSpec], seed: int, problems: list[str]) -> None:
    """Build every trained system's recipe once, so graft configs and train values are checked now."""
    for system in systems:
        if system.grafts is None:
            continue
        grafts = system.grafts
        if system.budget_of is not None:
            grafts = with_lora_rank(grafts, 1)
        try:
            system_recipe(raw, system, seed, "unused", grafts)
        except RecipeError as err:
            detail = str(err).replace("bad recipe:\n  ", "").replace("\n  ", "; ")
            problems.append(f"systems.{system.name}: {detail}")


def quick_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """A CI-sized copy of a raw spec (``--quick``): 2 steps, 16 training examples (per task source, ``mix``
    included; a dataset gives all its rows), 8 held-out examples per evaluation, the first training seed,
    written under ``<output_dir>/quick`` so that it never replaces a full run's results or report; everything
    else (systems, grafts, tasks) unchanged."""
    quick = copy.deepcopy(raw)
    quick["output_dir"] = str(Path(output_dir_of(raw)) / "quick")
    train = quick.setdefault("train", {})
    train["steps"] = min(int(train.get("steps") or 2), 2)
    train["warmup_steps"] = 0
    train["batch_size"] = min(int(train.get("batch_size", 8)), 4)
    train["eval_every"] = 0
    data = quick.setdefault("data", {})
    for section in [data] + [m for m in data.get("mix") or [] if isinstance(m, dict)]:
        section["n_train"] = min(int(section.get("n_train", 16)), 16)
        section["n_eval"] = min(int(section.get("n_eval", 4)), 4)
    for item in quick.get("evals") or []:
        if isinstance(item, dict):
            item["n"] = min(int(item.get("n", 8)), 8)
    if quick.get("evals") is None and data.get("task"):
        quick["evals"] = [{"task": data["task"], "task_kwargs": data.get("task_kwargs", {}), "n": 8}]
    quick["seeds"] = list(quick.get("seeds") or [0])[:1]
    return quick
