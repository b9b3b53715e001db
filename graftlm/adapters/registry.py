"""The one registry of graft types: a new graft is a config class + a module class + one `register_graft`."""

from __future__ import annotations

from dataclasses import dataclass

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft import Graft


@dataclass(frozen=True)
class GraftType:
    name: str
    config_class: type[GraftConfig]
    graft_class: type[Graft]


_REGISTRY: dict[str, GraftType] = {}


class UnknownGraftTypeError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def register_graft(config_class: type[GraftConfig], graft_class: type[Graft]) -> None:
    """Register a graft type under ``config_class.graft_type``; re-registering the same pair is a no-op."""
    name = config_class.graft_type
    if not name:
        raise ValueError(f"{config_class.__name__} has no graft_type")
    existing = _REGISTRY.get(name)
    if existing and (existing.config_class, existing.graft_class) != (config_class, graft_class):
        raise ValueError(f"graft type {name!r} is already registered to {existing.graft_class.__name__}")
    graft_class.config_class = config_class
    _REGISTRY[name] = GraftType(name, config_class, graft_class)


def get_graft_type(name: str) -> GraftType:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownGraftTypeError(
            f"unknown graft type {name!r}; registered types: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        ) from None


def graft_type_for_config(config: GraftConfig) -> GraftType:
    graft_type = get_graft_type(config.graft_type)
    if not isinstance(config, graft_type.config_class):
        raise TypeError(f"{type(config).__name__} is not a {graft_type.config_class.__name__}")
    return graft_type


def registered_graft_types() -> list[str]:
    return sorted(_REGISTRY)
