"""Per-architecture hook points. `get_patch(model)` picks the patch for a model's ``model_type``."""

from __future__ import annotations

from torch import nn

from graftlm.patches.base import ArchitecturePatch
from graftlm.patches.gemma3 import Gemma3Patch
from graftlm.patches.llama import LlamaPatch

PATCHES: tuple[ArchitecturePatch, ...] = (LlamaPatch(), Gemma3Patch())


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no patch in graftlm."""


def supported_model_types() -> list[str]:
    return sorted(t for patch in PATCHES for t in patch.model_types)


def get_patch(model: nn.Module) -> ArchitecturePatch:
    """The patch for ``model`` (a ``*ForCausalLM``); raises naming the supported architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for patch in PATCHES:
        if model_type in patch.model_types:
            return patch
    raise UnsupportedArchitectureError(
        f"graftlm has no patch for model_type={model_type!r} ({type(model).__name__}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


__all__ = [
    "PATCHES",
    "ArchitecturePatch",
    "Gemma3Patch",
    "LlamaPatch",
    "UnsupportedArchitectureError",
    "get_patch",
    "supported_model_types",
]
