"""One generation cache for every graft: `GraftCache`, a transformers ``DynamicCache`` that also holds each
graft's own decode state (METHODS.md sections 1-4), so any stack of grafts generates with every graft active.

    layers        the base model's key/value layers (full or sliding, from its config), except where a graft
                  puts its own (Echo's window layers for the layers it replaces)
    graft_states  graft type -> that graft's `GraftState`: SST's carried states, the Attractor head's KV,
                  Echo's recall statistics, range search's key indexes

Every row operation transformers runs on a cache (``reorder_cache`` for beam search, ``batch_select_indices``
and ``batch_repeat_interleave``) runs on the key/value layers and then on every graft state, so all of them
follow the beams. ``crop`` (assisted decoding) first asks every state whether it can be cropped and refuses,
naming the grafts and why, before anything is cut: a state either is cut back with the keys and values or
the crop does not happen.

`GraftModel.generate` builds one for the active grafts (`GraftModel.make_cache`); pass one as the cache to
call the model by hand. A graft that finds no state of its own in the cache it is given raises (or, range
search, warns and decodes densely), never continues silently without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicCache


class CacheCropError(RuntimeError):
    """A `GraftCache` asked to drop tokens that a graft's state cannot give back."""


class GraftState:
    """One graft's generation state inside a `GraftCache`; every tensor is batch-leading (B rows).

    Subclasses implement `map_rows` (and `reset`, `nbytes`); reorder / select / repeat are row maps of it.
    A state that cannot be cut back returns the reason from `crop_refusal`; one that can implements `crop_to`.
    """

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:  # pragma: no cover - per state
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_rows(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_rows(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_rows(lambda x: x[indices.to(x.device)])

    def crop_refusal(self, length: int) -> str | None:
        """Why this state cannot be cut back to the first ``length`` positions now (None: it can). The default
        refuses for a state class that has no `crop_to` of its own."""
        if type(self).crop_to is GraftState.crop_to:
            return f"{type(self).__name__} does not implement crop_to"
        return None

    def crop_to(self, length: int, removed: int) -> None:
        """Keep the state of the first ``length`` positions (the cache's new length, after ``removed`` tokens
        were dropped; 0 for transformers' ``crop(0)``, which only trims what was recorded). Only called when
        `crop_refusal` is None."""

    def activate_past_recording(self, length: int) -> None:
        """From the cache's current ``length`` on, keep what `crop_to` needs to go back (transformers calls it
        before assisted decoding); the default keeps nothing more."""

    def deactivate_past_recording(self) -> None:
        """Stop keeping what `activate_past_recording` started to keep."""

    def reset(self) -> None:  # pragma: no cover - per state
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of tensors held."""
        return 0


class GraftCache(DynamicCache):
    """A ``DynamicCache`` holding every graft's state (``graft_states``, keyed by graft type) beside the keys and
    values; ``layers`` (index -> cache layer) replaces the base's own key/value layer at those indices.

    A layer class with ``builds_own_mask = True`` is reported in ``is_linear`` so transformers never sizes the
    model's shared attention masks from it (Echo's window layers: the graft builds its own window mask).
    """

    def __init__(self, config, states: dict[str, GraftState] | None = None, layers: dict[int, Any] | None = None):
        super().__init__(config=config)
        for index, layer in (layers or {}).items():
            self.layers[index] = layer
        self.graft_states: dict[str, GraftState] = dict(states or {})

    def state(self, key: str) -> GraftState | None:
        """The state of the graft of type ``key``, or None when this cache was built without it."""
        return self.graft_states.get(key)

    @property
    def is_linear(self) -> list[bool]:
        return [flag or getattr(layer, "builds_own_mask", False) for flag, layer in zip(super().is_linear, self.layers)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for state in self.graft_states.values():
            state.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for state in self.graft_states.values():
            state.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for state in self.graft_states.values():
            state.batch_select_indices(indices)

    def reset(self) -> None:
        super().reset()
        for state in self.graft_states.values():
            state.reset()

    def activate_past_recording(self, **kwargs) -> None:
        """``kwargs`` (transformers >= 5.25 passes ``recurrent_states_to_keep``) go to the DynamicCache."""
        super().activate_past_recording(**kwargs)
        length = self.get_seq_length()
        for state in self.graft_states.values():
            state.activate_past_recording(length)

    def crop_refusals(self, length: int) -> dict[str, str]:
        """Graft type -> why its state cannot be cropped to ``length`` positions now (empty: every state can)."""
        return {key: reason for key, state in self.graft_states.items() if (reason := state.crop_refusal(length))}

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count) from the keys,
        values and every graft state, or raise `CacheCropError` naming the states that cannot be cut back and
        change nothing. ``crop(0)`` only lets states trim what they recorded."""
        if tokens_to_remove > 0:
            raise ValueError(f"GraftCache.crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        length = max(0, self.get_seq_length() + tokens_to_remove)
        refusals = self.crop_refusals(length)
        if tokens_to_remove != 0 and refusals:
            reasons = "; ".join(f"{key}: {reason}" for key, reason in refusals.items())
            raise CacheCropError(f"this GraftCache cannot be cropped by {-tokens_to_remove} token(s): {reasons}")
        super().crop(tokens_to_remove)
        for key, state in self.graft_states.items():
            if key not in refusals:
                state.crop_to(length, -tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        """Whether the tokens that come next can be cropped again (transformers asks before assisted decoding)."""
        return super().is_croppable and not self.crop_refusals(self.get_seq_length())

    def deactivate_past_recording(self) -> None:
        """Stop recording for a later crop and trim what was recorded (the counterpart of
        `activate_past_recording`, which transformers ends by clearing each layer's ``record_past``)."""
        for layer in self.layers:
            if getattr(layer, "record_past", False):
                layer.crop(0)
                layer.record_past = False
        for state in self.graft_states.values():
            state.deactivate_past_recording()

    def kv_bytes(self, layer_idx: int | None = None) -> int:
        """Bytes of keys and values held (one layer, or all)."""
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        return sum(t.numel() * t.element_size() for layer in layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


def state_of(cache: Any, key: str, make: Callable[[], GraftState] | None = None) -> GraftState | None:
    """The state of graft type ``key`` on ``cache`` (None: no cache, or none there).

    A `GraftCache` holds it in ``graft_states``. On any other transformers cache (one the caller made, or
    the model made for itself) a graft that passes ``make`` keeps its state as an attribute of that cache
    (``graftlm_<key>``): forward passes and greedy decoding are then exact, but that cache's reorder and crop
    don't reach the state, so `GraftModel.generate` refuses beam search and assisted decoding with it.
    """
    if cache is None:
        return None
    if isinstance(cache, GraftCache):
        return cache.graft_states.get(key)
    attribute = f"graftlm_{key}"
    state = cache.__dict__.get(attribute)
    if state is None and make is not None:
        state = make()
        setattr(cache, attribute, state)
    return state


def missing_state_error(graft_type: str, cache: Any) -> RuntimeError:
    """The error of a graft continuing a sequence from a cache that holds none of its state."""
    return RuntimeError(
        f"the {graft_type} graft continues a sequence only from a cache holding its state; this "
        f"{type(cache).__name__} holds none (built before the graft was attached, or without it?): use "
        f"GraftModel.generate, or pass graft_model.make_cache() as the cache")
