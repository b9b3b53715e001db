"""`GraftConfig`: the base dataclass of every graft's configuration: declarative field checks, JSON round trip.

Every field is checked when a config is built, when one is read from a saved ``adapter_config.json``
(before anything is installed), and again when it is attached or saved (in case it was changed since):

* its type, from the annotation: ``int``, ``float`` (finite), ``bool``, ``str``, ``Literal[...]``,
  ``list[T]``, ``X | None``;
* its range or choices, from the field's metadata beside its help text::

      r: int = field(default=8, metadata={"help": "LoRA rank.", "min": 1})

  ``min`` / ``max`` are inclusive bounds, ``gt`` / ``lt`` exclusive ones, ``choices`` lists the values a
  ``str`` may take, ``non_empty`` refuses an empty list.

Values are normalised on the way: numpy and other integral / real scalars become ``int`` / ``float``, a
tuple or range becomes a list, and a lone string given for a list of strings is a one-item list
(``target_modules="q_proj"`` means ``["q_proj"]``: module names, never split into letters, and not a
regular expression as a string is in peft). Rules across fields (``blend_min < blend_init < blend_max``)
live in each config's `GraftConfig.validate`. Problems raise one `GraftConfigError` naming the class,
each field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np


class GraftConfigWarning(UserWarning):
    """A saved config has keys this version doesn't know (written by a newer graftlm)."""


class GraftConfigError(ValueError):
    """A graft config holds values the graft cannot use; ``problems`` is a list of (field, message)."""

    def __init__(self, config_name: str, problems: list[tuple[str, str]]):
        self.config_name = config_name
        self.problems = list(problems)
        super().__init__("; ".join(f"{config_name}.{name}: {message}" if name else f"{config_name}: {message}"
                                   for name, message in self.problems))

    def __reduce__(self):
        return type(self), (self.config_name, self.problems)


@dataclass
class GraftConfig:
    """Fields shared by every graft. Subclasses set ``graft_type`` and add their own fields.

    Every field carries ``metadata={"help": ...}`` like peft's configs, so ``graftlm`` can print them, and
    its allowed range (module docstring); cross-field rules go in `validate` (a subclass that still needs
    ``__post_init__`` calls ``super().__post_init__()``).
    """

    graft_type: ClassVar[str] = ""

    target_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of decoder layers the graft attaches to (negative: from the end); None means "
                          "every layer.", "non_empty": True},
    )
    inference_mode: bool = field(
        default=False,
        metadata={"help": "Attach frozen (for inference): the graft's parameters get requires_grad=False."},
    )

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check and normalise every field (module docstring), then the cross-field rules of `validate`;
        raises `GraftConfigError` naming every bad field."""
        hints = _type_hints(type(self))
        problems = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            try:
                setattr(self, spec.name, _check_value(value, hints[spec.name], spec.metadata))
            except _Invalid as err:
                problems.append((spec.name, f"must be {_allowed(hints[spec.name], spec.metadata)}, got {err}"))
        if problems:
            raise GraftConfigError(type(self).__name__, problems)
        self.validate()

    def validate(self) -> None:
        """Rules across fields (each field alone is already checked); raise ``self.error(field, message)``."""

    def error(self, name: str, message: str) -> GraftConfigError:
        """The `GraftConfigError` for one field of this config (for `validate`)."""
        return GraftConfigError(type(self).__name__, [(name, message)])

    def validate_for_model(self, model_config: Any) -> None:
        """Rules that depend on the base model (``model.config``), checked before the graft is built."""
        self.resolve_layers(model_config.num_hidden_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GraftConfig:
        """Build a config from saved values, checked like any other; unknown keys (from a newer version)
        warn and are ignored."""
        if not isinstance(values, dict):
            message = f"the saved config must be a mapping of field values, got {_shown(values)}"
            raise GraftConfigError(cls.__name__, [("", message)])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config keys {unknown} (saved by a newer graftlm?)",
                GraftConfigWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in values.items() if k in known})

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The target layers as sorted non-negative indices; raises on an index outside the model."""
        if self.target_layers is None:
            return list(range(num_layers))
        resolved = sorted({i + num_layers if i < 0 else i for i in self.target_layers})
        if any(not 0 <= i < num_layers for i in resolved):
            raise self.error("target_layers", f"target_layers {self.target_layers} outside the model's {num_layers} "
                                              f"layers (valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
        return resolved

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# -- the declarative checks ----------------------------------------------------------------------------
class _Invalid(Exception):
    """A value that does not fit its field; the message is what was given."""


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _given(value: Any) -> str:
    """What was given, with its type when the type is the problem."""
    return f"{_shown(value)} ({type(value).__name__})"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _check_value(value: Any, annotation: Any, meta: typing.Mapping[str, Any]) -> Any:
    """``value`` checked against ``annotation`` and ``meta`` and normalised; raises `_Invalid`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        if value is None:
            if type(None) in args:
                return None
            raise _Invalid("None")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _check_value(value, options[0], meta)
        for option in options:
            try:
                return _check_value(value, option, meta)
            except _Invalid:
                pass
        raise _Invalid(_given(value))
    if annotation is Any:
        return value
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Invalid(_shown(value))
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _Invalid(_given(value))
    if annotation is int:
        if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
            raise _Invalid(_given(value))
        return _in_range(int(value), meta)
    if annotation is float:
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
            raise _Invalid(_given(value))
        if not math.isfinite(value):
            raise _Invalid(_shown(value))
        return _in_range(float(value), meta)
    if annotation is str:
        if not isinstance(value, str):
            raise _Invalid(_given(value))
        if "choices" in meta and value not in meta["choices"]:
            raise _Invalid(_shown(value))
        return value
    if origin is list or annotation is list:
        item_type = args[0] if args else Any
        if isinstance(value, str) and item_type is str:
            value = [value]
        if not isinstance(value, (list, tuple, range)):
            raise _Invalid(_given(value))
        items = []
        for position, item in enumerate(value):
            try:
                items.append(_check_value(item, item_type, {}))
            except _Invalid as err:
                raise _Invalid(f"{_shown(value)} (item {position} is {err})") from None
        if meta.get("non_empty") and not items:
            raise _Invalid("[]")
        return items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Invalid(_given(value))
        return dict(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise _Invalid(_given(value))
    return value


def _in_range(value: float, meta: typing.Mapping[str, Any]) -> float:
    ok = (("min" not in meta or value >= meta["min"]) and ("max" not in meta or value <= meta["max"])
          and ("gt" not in meta or value > meta["gt"]) and ("lt" not in meta or value < meta["lt"]))
    if not ok:
        raise _Invalid(_shown(value))
    return value


def _allowed(annotation: Any, meta: typing.Mapping[str, Any]) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'one of 'a', 'b'', 'a list of strings'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        options = [_allowed(a, meta) for a in args if a is not type(None)]
        return " or ".join(options + (["None"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if annotation is bool:
        return "True or False"
    if annotation is int:
        return "an integer" + _range_words(meta)
    if annotation is float:
        return "a finite number" + _range_words(meta)
    if annotation is str:
        return "one of " + ", ".join(map(repr, meta["choices"])) if "choices" in meta else "a string"
    if origin is list or annotation is list:
        item = args[0] if args else Any
        words = {int: "integers", float: "numbers", str: "strings (a single string is a one-item list)"}
        return f"a {'non-empty ' if meta.get('non_empty') else ''}list of {words.get(item, _allowed(item, {}))}"
    if origin is dict or annotation is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _range_words(meta: typing.Mapping[str, Any]) -> str:
    low = ("[", meta["min"]) if "min" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = ("]", meta["max"]) if "max" in meta else (")", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""
