"""The name transformers gives the generation cache in forward / generate kwargs and in model outputs.

transformers 5.24 renamed ``past_key_values`` to ``cache``: its own code passes ``cache=`` to the
decoder, the layers and the attention modules, and outputs carry ``.cache``; the old name is still
accepted at the top-level forward and ``generate`` (renamed inside, with a deprecation warning) and goes
away in 6.0. A forward hook sees the kwargs as the module was called, so a hook that looked only for
``past_key_values`` would see no cache at all on 5.24 and quietly decode without the graft's state.
Grafts therefore read both names and write the one the installed transformers uses.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

NAMES = ("cache", "past_key_values")


@functools.cache
def cache_kwarg() -> str:
    """``"cache"`` on transformers >= 5.24, else ``"past_key_values"`` (read off LlamaModel.forward)."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The cache a module was called with under either name, or None."""
    for name in NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def with_cache(kwargs: Mapping[str, Any], cache: Any) -> dict[str, Any]:
    """``kwargs`` with ``cache`` under the installed transformers' name (and neither name otherwise)."""
    rest = {k: v for k, v in kwargs.items() if k not in NAMES}
    return {**rest, cache_kwarg(): cache}


def cache_from_output(output: Any) -> Any:
    """The cache a model output carries (``.cache`` or ``.past_key_values``), or None."""
    return getattr(output, cache_kwarg(), None)
