"""`Recipe`: one training run as a YAML file (model, graft(s), data, hyper-parameters), validated up front.

A recipe file::

    model: {name: smollm2-135m}
    graft: {type: lora, r: 8}                  # or a list of mappings to stack grafts (`adapter_name`)
    data: {task: chain_sum, n_train: 512, n_eval: 64}     # or `dataset:` a .jsonl file / datasets source
    train: {steps: 100, batch_size: 8, lr: 1.0e-3}
    output_dir: runs/lora-smollm2-135m

Every value is checked and coerced to its field's type when the recipe is loaded; unknown keys and bad
values raise `RecipeError` naming each problem, before any model is loaded. ``--key value`` overrides use
dotted keys into the same structure (``--train.steps 50``, ``--graft.r 16``, ``--graft.1.r 4`` for the
second of stacked grafts) and go through the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import pkgutil
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from graftlm.adapters import GraftConfig, GraftConfigError, get_graft_type, registered_graft_types
from graftlm.adapters.model import DEFAULT_ADAPTER_NAME, check_adapter_name


class RecipeError(ValueError):
    """A recipe that cannot run: unknown keys, values of the wrong type or range, a graft that doesn't fit."""


class CliString(str):
    """A value typed on the command line: parsed as YAML when its field is not a string."""


# -- sections ------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    name: str = field(metadata={"help": "Embedded checkpoint name (smollm2-135m, gemma-3-270m), local dir or Hub id."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype the frozen base is loaded in."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "transformers attention implementation."})


@dataclass
class DataSection:
    task: str | None = field(default=None, metadata={"help": "Task name in graftlm.eval's registry."})
    task_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of the task."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "A JSON-lines file; a local dataset directory (datasets' save_to_disk, or a folder of "
                          "data files); a datasets builder ('json', 'csv', 'parquet', 'text') with data_files; or "
                          "a dataset name already in the local Hugging Face cache (works offline)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Data files of a builder dataset."})
    load_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "More keyword arguments of datasets.load_dataset, e.g. {sample_by: document} for the "
                          "text builder (one row per file, line breaks kept; the default is one row per line)."},
    )
    split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Held-out split of `dataset`; default: n_eval examples held out of `split`."}
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "A held-out source like `dataset`, read with the same fields."}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Column of the prompt (what the model reads)."})
    answer_field: str = field(
        default="answer", metadata={"help": "Column of the answer, appended to the prompt exactly as written."}
    )
    text_field: str | None = field(
        default=None, metadata={"help": "Column of plain text for language-model training (loss on every token)."}
    )
    messages_field: str | None = field(
        default=None,
        metadata={"help": "Column of chat messages [{role, content}, ...], rendered with the tokenizer's chat "
                          "template; the loss is on the last (assistant) message."},
    )
    packing: bool = field(
        default=False, metadata={"help": "Plain text: concatenate the texts and cut them into max_length blocks."}
    )
    mix: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "More training sources mixed into this one: each a data mapping of its own (a task or a "
                          "dataset, with its own n_train, n_eval, seed, fields and packing; not mix or max_length, "
                          "which they share); their examples join the training and held-out sets and the batches "
                          "draw from the union in a seeded shuffle."},
    )
    n_train: int = field(default=1024, metadata={"help": "Training examples generated from the task."})
    n_eval: int = field(default=64, metadata={"help": "Held-out examples for the eval loss (0: no eval)."})
    seed: int = field(
        default=1,
        metadata={"help": "Seed of the task's examples / the held-out split; keep it apart from `graftlm eval`'s "
                          "seed (0 by default) so the scored examples are not the training ones."},
    )
    max_length: int = field(
        default=256, metadata={"help": "Longest tokenized example (prompt + answer); longer ones are dropped."}
    )
    answer_end: Literal["auto", "newline", "eos", "none"] = field(
        default="auto",
        metadata={"help": "How a training answer ends: newline (where a task's scoring stops reading), the "
                          "tokenizer's eos, or none; auto: newline for tasks scored up to a newline, else eos."},
    )


@dataclass
class TrainSection:
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps (wins over epochs)."})
    epochs: float | None = field(default=None, metadata={"help": "Passes over the training set when steps is unset."})
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch, per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated into one optimizer step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (AdamW) / L2 (SGD)."})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "Optimizer of the graft params."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps of the LR schedule."})
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = field(
        default="cosine", metadata={"help": "LR schedule after warm-up (transformers' get_scheduler)."}
    )
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm; null: none."})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto: bf16 on a GPU that supports it, none on CPU."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute the frozen base's layers."})
    eval_every: int = field(default=0, metadata={"help": "Eval loss every N steps (0: only at the end)."})
    checkpoint_every: int = field(default=0, metadata={"help": "Adapter + trainer state every N steps (0: never)."})
    log_every: int = field(default=1, metadata={"help": "Write a log line every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of graft initialisation, data order and dropout."})
    resume_from: str | None = field(
        default=None, metadata={"help": "Checkpoint directory to resume from, or 'latest' in output_dir."}
    )
    find_unused_parameters: bool = field(
        default=True, metadata={"help": "DDP: tolerate graft params unused in a step (a small cost per step)."}
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm bar on the main process."})


@dataclass
class GraftSpec:
    """One graft of the recipe: its registered type, adapter name and validated config."""

    type: str
    adapter_name: str
    config: GraftConfig

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "adapter_name": self.adapter_name, **self.config.to_dict()}


@dataclass
class Recipe:
    model: ModelSection
    grafts: list[GraftSpec]
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/train"
    log_file: str | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.log_file) if self.log_file else Path(self.output_dir) / "train_log.jsonl"

    def to_dict(self) -> dict[str, Any]:
        grafts = [g.to_dict() for g in self.grafts]
        return {
            "model": dataclasses.asdict(self.model),
            "graft": grafts[0] if len(grafts) == 1 else grafts,
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "output_dir": self.output_dir,
            "log_file": self.log_file,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        return build_recipe(values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        return load_recipe(path, overrides)


TOP_LEVEL_KEYS = {"model", "graft", "data", "train", "output_dir", "log_file"}


# -- loading -------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply ``--key value`` overrides, validate; raises `RecipeError`."""
    path = resolve_recipe_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping, not {type(raw).__name__}")
    apply_overrides(raw, parse_override_args(overrides or []))
    try:
        return build_recipe(raw)
    except RecipeError as err:
        raise RecipeError(f"recipe {path}: {err}") from None


SHIPPED_RECIPES = Path(__file__).parent / "configs"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in ``graftlm/recipes/configs`` (usable instead of a path)."""
    return sorted(p.stem for p in SHIPPED_RECIPES.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe file, or the shipped recipe of that name (``lora-smollm2-135m``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED_RECIPES / f"{path.name.removesuffix('.yaml')}.yaml"
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    raise RecipeError(f"recipe file {path} does not exist (shipped recipes: {', '.join(shipped_recipes())})")


def parse_override_args(args: list[str]) -> list[tuple[str, CliString]]:
    """``['--train.steps', '50', '--graft.r=4', '--train.gradient_checkpointing']`` -> (key, value) pairs.

    A key with no value (followed by another ``--key`` or nothing) means ``true``.
    """
    pairs: list[tuple[str, CliString]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise RecipeError(f"expected an override `--key value`, got {token!r}")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not _looks_like_key(args[i + 1]):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        pairs.append((key.replace("-", "_"), CliString(value)))
    return pairs


def _looks_like_key(token: str) -> bool:
    return token.startswith("--") and not _FLOAT.fullmatch(token)


def apply_overrides(raw: dict[str, Any], pairs: list[tuple[str, Any]]) -> None:
    """Set each dotted key in the raw recipe mapping (list items by index: ``graft.1.r``)."""
    for key, value in pairs:
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, here)]
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override --{key}: {here} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, node, key)] = value
        else:
            node[last] = value


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {where}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def build_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a raw recipe mapping into a `Recipe`, reporting every problem at once."""
    problems: list[str] = []
    _check_keys(raw, TOP_LEVEL_KEYS, "", problems)
    if "model" not in raw:
        problems.append("model: missing (a mapping with at least `name`)")
    if "graft" not in raw:
        problems.append("graft: missing (a mapping with at least `type`, or a list of them)")

    model = _build_section(ModelSection, raw.get("model"), "model", problems) if "model" in raw else None
    data = _build_section(DataSection, raw.get("data") or {}, "data", problems)
    train = _build_section(TrainSection, raw.get("train") or {}, "train", problems)
    grafts = _build_grafts(raw.get("graft"), problems) if "graft" in raw else []
    output_dir = _coerce(raw.get("output_dir", "runs/train"), str, "output_dir", problems)
    log_file = _coerce(raw.get("log_file"), str | None, "log_file", problems)

    if data is not None:
        _check_data(data, problems)
    if train is not None:
        _check_train(train, problems)
    if problems:
        raise RecipeError("bad recipe:\n  " + "\n  ".join(problems))
    return Recipe(model=model, grafts=grafts, data=data, train=train, output_dir=output_dir, log_file=log_file)


def check_recipe_inputs(recipe: Recipe) -> None:
    """What a recipe names outside itself, checked without loading the model: the data source loads and has
    the fields the recipe names, or the task is registered and accepts its ``task_kwargs``; a resume
    checkpoint directory exists.

    `build_recipe` checks the values; this checks the world (``graftlm train`` runs both, --dry-run too).
    Raises `RecipeError` naming every problem.
    """
    from graftlm.recipes.sources import check_data_source

    problems = check_data_source(recipe.data)
    resume = recipe.train.resume_from
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        problems.append(f"train.resume_from: no checkpoint directory at {resume}")
    if problems:
        raise RecipeError("bad recipe:\n  " + "\n  ".join(problems))


def _check_data(data: DataSection, problems: list[str]) -> None:
    if (data.task is None) == (data.dataset is None):
        problems.append("data: give exactly one of `task` (a graftlm.eval task name) or `dataset` (a .jsonl file "
                        "or a datasets source)")
    if data.task_kwargs and data.task is None:
        problems.append("data.task_kwargs: set, but there is no data.task")
    if data.task is not None:
        for name in ("dataset_config", "data_files", "eval_split", "eval_dataset", "text_field", "messages_field"):
            if getattr(data, name) is not None:
                problems.append(f"data.{name}: set, but the data is a task (it applies to data.dataset)")
        if data.load_kwargs:
            problems.append("data.load_kwargs: set, but the data is a task (it applies to data.dataset)")
    if data.text_field is not None and data.messages_field is not None:
        problems.append("data: give at most one of `text_field` (plain text) and `messages_field` (chat)")
    if data.packing and data.text_field is None:
        problems.append("data.packing: applies to plain text only; set data.text_field")
    if data.eval_split is not None and data.eval_dataset is not None:
        problems.append("data: give at most one of `eval_split` and `eval_dataset`")
    for name in ("n_train", "max_length"):
        if getattr(data, name) < 1:
            problems.append(f"data.{name}: must be >= 1, got {getattr(data, name)}")
    if data.n_eval < 0:
        problems.append(f"data.n_eval: must be >= 0, got {data.n_eval}")
    for index, item in enumerate(data.mix):
        where = f"data.mix.{index}"
        for shared in ("mix", "max_length"):
            if shared in item:
                problems.append(f"{where}.{shared}: the mixed sources share the main data section's {shared}")
        if not any(key in item for key in ("mix", "max_length")):
            section = _build_section(DataSection, item, where, problems)
            if section is not None:
                inner: list[str] = []
                _check_data(section, inner)
                problems.extend(p.replace("data.", f"{where}.", 1) if p.startswith("data.") else
                                p.replace("data:", f"{where}:", 1) for p in inner)


def mixed_sections(data: DataSection) -> list[DataSection]:
    """The validated data sections of ``data.mix`` (each with the main section's ``max_length``)."""
    return [_build_section(DataSection, {**item, "max_length": data.max_length}, f"data.mix.{i}", [])
            for i, item in enumerate(data.mix)]


def _check_train(train: TrainSection, problems: list[str]) -> None:
    positive = ("batch_size", "grad_accum", "log_every")
    for name in positive:
        if getattr(train, name) < 1:
            problems.append(f"train.{name}: must be >= 1, got {getattr(train, name)}")
    non_negative = ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay")
    for name in non_negative:
        if getattr(train, name) < 0:
            problems.append(f"train.{name}: must be >= 0, got {getattr(train, name)}")
    if not (train.lr > 0 and math.isfinite(train.lr)):
        problems.append(f"train.lr: must be a positive number, got {train.lr}")
    if train.steps is not None and train.steps < 1:
        problems.append(f"train.steps: must be >= 1, got {train.steps}")
    if train.epochs is not None and not train.epochs > 0:
        problems.append(f"train.epochs: must be > 0, got {train.epochs}")
    if train.max_grad_norm is not None and not train.max_grad_norm > 0:
        problems.append(f"train.max_grad_norm: must be > 0 or null, got {train.max_grad_norm}")
    if len(train.adam_betas) != 2 or not all(0 <= b < 1 for b in train.adam_betas):
        problems.append(f"train.adam_betas: must be two numbers in [0, 1), got {train.adam_betas}")


def _check_keys(values: dict[str, Any], known: set[str], where: str, problems: list[str]) -> None:
    for key in sorted(set(values) - known, key=str):
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {where}{close[0]}?)" if close else f"; known keys: {', '.join(sorted(known))}"
        problems.append(f"{where}{key}: unknown key{hint}")


def _build_section(cls: type, values: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(values, dict):
        problems.append(f"{where}: must be a mapping, got {type(values).__name__} {values!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    before = len(problems)
    _check_keys(values, set(fields), f"{where}.", problems)
    kwargs = {}
    for name, spec in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{where}.{name}", problems)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            problems.append(f"{where}.{name}: missing")
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except GraftConfigError as err:  # a graft config's own range and cross-field checks
        problems.extend(f"{where}.{name}: {message}" if name else f"{where}: {message}" for name, message in err.problems)
        return None


# -- grafts --------------------------------------------------------------------------------------
def import_graft_modules() -> dict[str, str]:
    """Import every module of `graftlm.adapters` so each graft registers itself; returns import failures.

    A graft module that fails to import (e.g. one being written) must not stop recipes of other grafts.
    """
    from graftlm import adapters

    failures = {}
    for module in pkgutil.iter_modules(adapters.__path__):
        name = f"graftlm.adapters.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - reported by name when that graft type is asked for
            failures[name] = f"{type(err).__name__}: {err}"
    return failures


def _build_grafts(values: Any, problems: list[str]) -> list[GraftSpec]:
    items = values if isinstance(values, list) else [values]
    if not items:
        problems.append("graft: an empty list; give at least one graft")
        return []
    failures = import_graft_modules()
    specs, names = [], set()
    for index, item in enumerate(items):
        where = "graft" if not isinstance(values, list) else f"graft.{index}"
        spec = _build_graft(item, where, index, failures, problems)
        if spec is None:
            continue
        if spec.adapter_name in names:
            problems.append(f"{where}.adapter_name: {spec.adapter_name!r} is used twice")
        names.add(spec.adapter_name)
        specs.append(spec)
    return specs


def _build_graft(item: Any, where: str, index: int, failures: dict[str, str], problems: list[str]):
    if not isinstance(item, dict) or "type" not in item:
        problems.append(f"{where}: must be a mapping with a `type` (one of {', '.join(registered_graft_types())})")
        return None
    type_name = str(item["type"])
    if type_name not in registered_graft_types():
        failed = "; ".join(f"{m} failed to import ({e})" for m, e in failures.items())
        problems.append(
            f"{where}.type: unknown graft type {type_name!r}; registered: {', '.join(registered_graft_types())}"
            + (f"; {failed}" if failed else "")
        )
        return None
    config_class = get_graft_type(type_name).config_class
    default_name = DEFAULT_ADAPTER_NAME if index == 0 else type_name
    adapter_name = _coerce(item.get("adapter_name", default_name), str, f"{where}.adapter_name", problems)
    if adapter_name is not None:
        try:
            check_adapter_name(adapter_name, f"{where}.adapter_name:")
        except ValueError as err:
            problems.append(str(err))
    fields = {k: v for k, v in item.items() if k not in ("type", "adapter_name")}
    config = _build_section(config_class, fields, where, problems)
    if config is None:
        return None
    if config.inference_mode:
        problems.append(f"{where}.inference_mode: true would freeze the graft; a recipe trains it")
        return None
    return GraftSpec(type=type_name, adapter_name=adapter_name, config=config)


# -- type coercion -------------------------------------------------------------------------------
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NONE_WORDS = {"null", "none", "~", ""}
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class _Invalid(Exception):
    pass


def _coerce(value: Any, annotation: Any, where: str, problems: list[str]) -> Any:
    """``value`` as ``annotation`` (int, float, bool, str, list[T], dict, Literal, X | None, Any)."""
    try:
        return _convert(value, annotation)
    except _Invalid as err:
        problems.append(f"{where}: {err}")
        return None


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _parse_cli(value: str) -> Any:
    if _FLOAT.fullmatch(value.strip()) and not re.fullmatch(r"[-+]?\d+", value.strip()):
        return float(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _convert(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return _parse_cli(value) if isinstance(value, CliString) else value
    if origin in (typing.Union, types.UnionType):
        allows_none = type(None) in args
        if value is None or (allows_none and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if allows_none:
                return None
            raise _Invalid(f"must be {_describe(annotation)}, got null")
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option)
            except _Invalid:
                pass
        raise _Invalid(f"must be {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        text = str(value)
        if text not in [str(a) for a in args]:
            raise _Invalid(f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return type(args[0])(text)
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, CliString):
            parsed = _parse_cli(value)
            value = parsed if isinstance(parsed, list) else [item.strip() for item in value.split(",")]
        item_type = args[0] if args else Any
        if isinstance(value, str) and item_type is str:  # as in the Python API: one name is a one-item list
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"must be a list, got {type(value).__name__} {value!r}")
        return [_convert(CliString(v) if isinstance(value, CliString) and isinstance(v, str) else v, item_type)
                for v in value]
    if origin is dict or annotation is dict:
        if isinstance(value, CliString):
            value = _parse_cli(value)
        if not isinstance(value, dict):
            raise _Invalid(f"must be a mapping, got {type(value).__name__} {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {key: _convert(item, value_type) for key, item in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise _Invalid(f"must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, str):
            value = _parse_cli(value)
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            raise _Invalid(f"must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, str):
            value = _parse_cli(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise _Invalid(f"must be a string, got {value!r}")
        return str(value)
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _Invalid(f"cannot read {value!r} as {_describe(annotation)}")
