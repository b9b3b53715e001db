"""`GraftConfig`: the base dataclass of every graft's configuration, and its JSON round trip."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar


class GraftConfigWarning(UserWarning):
    """A saved config has keys this version doesn't know (written by a newer graftlm)."""


@dataclass
class GraftConfig:
    """Fields shared by every graft. Subclasses set ``graft_type`` and add their own fields.

    Every field carries ``metadata={"help": ...}`` like peft's configs, so ``graftlm`` can print them.
    """

    graft_type: ClassVar[str] = ""

    target_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of decoder layers the graft attaches to; None means every layer."},
    )
    inference_mode: bool = field(
        default=False,
        metadata={"help": "Attach frozen (for inference): the graft's parameters get requires_grad=False."},
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GraftConfig:
        """Build a config from saved values; unknown keys (from a newer version) warn and are ignored."""
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
        bad = [i for i in resolved if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"target_layers {self.target_layers} outside the model's {num_layers} layers")
        return resolved

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
