"""The Echo graft's generation state (METHODS.md section 3): `EchoCacheState`, its part of a `GraftCache`,
the `EchoCache` that holds only it, and the functions that advance that state.

Per grafted layer the state holds an `EchoStateLayer` (modelled on transformers' ``LinearAttentionLayer``:
a fixed-size recurrent state with no sequence dimension):

    state  EchoState  G [B, H, r, r], M [B, H, r, r], C [B, H, P, r], last key [B, H, r], key norm [B, H],
                      held readout [B, H, P, r] (chunk size > 1), compensation of G and M (float32)
    seen   [B] long   real (non-padding) tokens each row has absorbed
    phases            the same counts on the host (a tuple of B ints), or None when unknown

so ``H (2 r^2 + 2 P r + r + 1)`` floats per row and layer, constant in the sequence length. Layers whose
attention the graft replaces (``mode="replace"``) keep their keys and values in an `EchoWindowLayer`:
a sliding window of the last ``window - 1`` tokens and the rows' first ``sink_tokens`` real tokens, never more.

Prefill runs the chunk-parallel operator (``echo_chunked(..., return_state=True)``), decode runs
``echo_step`` per token; with the same chunk size the two give the output of one chunked forward over
the whole sequence (the kernel's causality rule: the query at t reads the tokens before its chunk).

Padding. Padded tokens never enter the statistics. A batch with padding (left or right) is prefilled row
by row over each row's real tokens only, so each row's chunk grid starts at its first real token and a
left-padded row gives exactly the output of the same row unpadded. Rows then sit at different phases of
their chunks, so decode refreshes the held readout per row (when that row's ``seen`` reaches a chunk
boundary) instead of on the shared ``EchoState.position``. Tokens after prefill are assumed real (as in
``generate``); a padded token in a continuation raises.

Host syncs: which rows start a chunk at a decode step is known on the host (``phases``, set at prefill
and advanced per token), so decode rebuilds the readout only at the steps where some row needs it and
never reads a device value. After a beam reorder or row selection the phases are unknown, and every
step then rebuilds the readout and picks it per row on the device (still no sync, more compute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from graftlm.adapters.graft_cache import GraftCache, GraftState
from graftlm.kernels.echo import EchoState, echo_chunked, echo_step, init_state, readout_operator
from graftlm.kernels.echo.reference import per_head

STATE_KEY = "echo"  # the Echo graft's key in GraftCache.graft_states (its graft type)


@dataclasses.dataclass(frozen=True)
class EchoSettings:
    """Operator settings shared by every grafted layer: K (``power``), chunk size L, eps, statistics dtype."""

    power: int
    chunk_size: int
    eps: float
    stats_dtype: torch.dtype


def map_state(state: EchoState, fn: Callable[[torch.Tensor], torch.Tensor]) -> EchoState:
    """Apply ``fn`` to every batch-leading tensor of ``state`` (reorder, select, repeat rows)."""
    optional = lambda t: None if t is None else fn(t)
    return dataclasses.replace(
        state, gram=fn(state.gram), lag=fn(state.lag), cross=fn(state.cross), prev_key=fn(state.prev_key),
        key_norm=fn(state.key_norm), readout=optional(state.readout), gram_carry=optional(state.gram_carry),
        lag_carry=optional(state.lag_carry),
    )


def stack_states(states: list[EchoState]) -> EchoState:
    """Concatenate one-row states along the batch; ``position`` (unused per row, see module doc) is the max."""
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in states]
        return None if parts[0] is None else torch.cat(parts, dim=0)

    first = states[0]
    return dataclasses.replace(
        first, gram=cat("gram"), lag=cat("lag"), cross=cat("cross"), prev_key=cat("prev_key"),
        key_norm=cat("key_norm"), readout=cat("readout"), gram_carry=cat("gram_carry"), lag_carry=cat("lag_carry"),
        position=max(s.position for s in states),
    )


def only_trailing_padding(keep: torch.Tensor) -> torch.Tensor:
    """True (a 0-dim bool tensor, on keep's device) when no real token follows a padded one in any row
    (right padding): keep [B, T] bool."""
    return (keep[:, 1:] <= keep[:, :-1]).all()


def _echo_rows(z, q, v, gamma, eta, keep, settings: EchoSettings, with_state: bool):
    """Row by row over each row's real tokens; pads get y = 0. Returns y [B, H, T, P] and row states."""
    y = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    outputs, states = [], []
    for row in range(z.shape[0]):
        index = keep[row].nonzero().squeeze(-1)
        if index.numel() == 0:
            outputs.append(y[row:row + 1])
            states.append(init_state(1, z.shape[1], z.shape[-1], v.shape[-1], power=settings.power,
                                     chunk_size=settings.chunk_size, eps=settings.eps,
                                     stats_dtype=settings.stats_dtype, device=z.device))
            continue
        z_row, q_row, v_row = (x[row:row + 1].index_select(2, index) for x in (z, q, v))
        result = echo_chunked(z_row, q_row, v_row, gamma, eta, power=settings.power,
                              chunk_size=settings.chunk_size, eps=settings.eps,
                              stats_dtype=settings.stats_dtype, return_state=with_state)
        y_row, state = result if with_state else (result, None)
        outputs.append(y[row:row + 1].index_copy(2, index, y_row))
        states.append(state)
    return torch.cat(outputs, dim=0), states


def echo_sequence(z, q, v, gamma, eta, keep: torch.Tensor | None, settings: EchoSettings,
                  trailing_padding: bool | None = None) -> torch.Tensor:
    """Echo output of whole sequences from an empty state (training, or a forward without a cache).

    z, q: [B, H, T, r]; v: [B, H, T, P]; keep: [B, T] bool (False = padding) or None. Returns y [B, H, T, P].
    Right padding (pads only after real tokens) runs as one batch: causality keeps pads out of the real
    tokens' outputs. Any other padding runs row by row (module doc). ``trailing_padding``: whether keep's
    padding is right padding, when the caller already knows (else it is read here, a host sync).
    """
    if trailing_padding is None and keep is not None:
        trailing_padding = bool(only_trailing_padding(keep))
    if keep is None or trailing_padding:
        return echo_chunked(z, q, v, gamma, eta, power=settings.power, chunk_size=settings.chunk_size,
                            eps=settings.eps, stats_dtype=settings.stats_dtype)
    y, _ = _echo_rows(z, q, v, gamma, eta, keep, settings, with_state=False)
    return y


def echo_prefill(z, q, v, gamma, eta, keep: torch.Tensor | None, settings: EchoSettings):
    """First tokens of a sequence into an empty state. Shapes as `echo_sequence`.

    Returns (y [B, H, T, P], EchoState, seen [B] long, phases: the same counts as a tuple of ints).
    """
    batch, length = z.shape[0], z.shape[2]
    if keep is None:
        y, state = echo_chunked(z, q, v, gamma, eta, power=settings.power, chunk_size=settings.chunk_size,
                                eps=settings.eps, stats_dtype=settings.stats_dtype, return_state=True)
        return y, state, torch.full((batch,), length, dtype=torch.long, device=z.device), (length,) * batch
    y, states = _echo_rows(z, q, v, gamma, eta, keep, settings, with_state=True)
    seen = keep.sum(-1).to(torch.long)
    return y, stack_states(states), seen, tuple(seen.tolist())  # a padded prefill reads its mask anyway


def echo_continue(state: EchoState, seen: torch.Tensor, z, q, v, gamma, eta, phases: tuple[int, ...] | None):
    """Advance a prefilled state token by token (``echo_step``), refreshing each row's held readout when
    that row's ``seen`` is at a chunk boundary. z, q: [B, H, T, r]; v: [B, H, T, P]; seen: [B];
    ``phases``: ``seen`` on the host, or None (unknown: the readout is rebuilt every token).

    Returns (y [B, H, T, P], new state, new seen, new phases). Makes no host sync.
    """
    outputs = []
    for t in range(z.shape[2]):
        position = state.position
        if state.chunk_size > 1:
            starting = None if phases is None else [p % state.chunk_size == 0 for p in phases]
            readout = state.readout
            if starting is None or any(starting):
                fresh = readout_operator(state.gram, state.lag, state.cross, per_head(gamma, 2, state.gram),
                                         state.power, state.eps)
                if starting is not None and all(starting):
                    readout = fresh
                else:
                    refresh = seen % state.chunk_size == 0
                    readout = torch.where(refresh.view(-1, 1, 1, 1), fresh, readout)
            # position 1 is mid-chunk for echo_step, so it reads through `readout` as given
            state = dataclasses.replace(state, readout=readout, position=1)
        y_t, state = echo_step(state, z[:, :, t], q[:, :, t], v[:, :, t], gamma, eta)
        state = dataclasses.replace(state, position=position + 1)
        seen = seen + 1
        phases = None if phases is None else tuple(p + 1 for p in phases)
        outputs.append(y_t)
    return torch.stack(outputs, dim=2), state, seen, phases


class EchoStateLayer:
    """The Echo state of one grafted layer inside an `EchoCache` (fixed size: no sequence dimension)."""

    def __init__(self) -> None:
        self.state: EchoState | None = None
        self.seen: torch.Tensor | None = None
        self.phases: tuple[int, ...] | None = None  # ``seen`` on the host, when known

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def update(self, state: EchoState, seen: torch.Tensor, phases: tuple[int, ...] | None) -> None:
        self.state, self.seen, self.phases = state, seen, phases

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], phases: tuple[int, ...] | None = None) -> None:
        if self.state is not None:
            self.state, self.seen, self.phases = map_state(self.state, fn), fn(self.seen), phases

    def _uniform_phases(self, rows: int) -> tuple[int, ...] | None:
        """``phases`` for ``rows`` rows picked from this batch, when every row has the same phase (the
        usual unpadded batch): a row gather then keeps the phases known on the host."""
        if self.phases is None or len(set(self.phases)) != 1:
            return None
        return (self.phases[0],) * rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda x: x.index_select(0, beam_idx.to(x.device)), self._uniform_phases(len(beam_idx)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        phases = None if self.phases is None else tuple(p for p in self.phases for _ in range(repeats))
        self._map_rows(lambda x: x.repeat_interleave(repeats, dim=0), phases)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        phases = None if indices.dtype == torch.bool else self._uniform_phases(len(indices))  # a mask: unknown
        self._map_rows(lambda x: x[indices], phases)

    def reset(self) -> None:
        self.state = self.seen = self.phases = None

    def nbytes(self) -> int:
        """Bytes held by the state tensors (0 before prefill)."""
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.tensors())


class EchoWindowLayer(DynamicSlidingWindowLayer):
    """KV cache of a layer whose attention Echo replaces: the last ``sliding_window - 1`` tokens, and with
    ``sinks`` > 0 also the first ``sink_span`` positions the layer saw (the rows' first ``sinks`` real
    tokens, the attention sinks; the span also covers the left padding before them: the graft sets it from
    the prefill's mask before the first update). Nothing else is ever kept.

    With sinks, the keys an update returns (and the layer holds) are the span followed by the most recent
    tokens, contiguous up to the newest: ``[0, sink_span) + [n - kept, n)``, or every position while that
    is no longer than the whole sequence. The graft's window attention derives each key's position from that.

    ``is_sliding`` is False and ``builds_own_mask`` makes `GraftCache` report the layer as linear, so
    transformers never sizes the model's shared full or sliding attention masks from this layer (the graft
    builds its own window mask).
    """

    is_sliding = False
    builds_own_mask = True

    def __init__(self, sliding_window: int, sinks: int = 0, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.sinks = sinks
        self.sink_span = sinks

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.sinks:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        recent = keys.shape[-2] - (self.sliding_window - 1)  # the first of the last sliding_window - 1 tokens
        if recent > self.sink_span:
            self.keys = torch.cat([keys[:, :, :self.sink_span], keys[:, :, recent:]], dim=-2)
            self.values = torch.cat([values[:, :, :self.sink_span], values[:, :, recent:]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.sinks:
            return super().get_mask_sizes(query_length)
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, 0

    def activate_past_recording(self, **kwargs) -> None:
        if self.sinks:
            raise ValueError("Echo window cache with sink tokens: assisted decoding (past recording) is not "
                             "supported; use sink_tokens=0")
        super().activate_past_recording(**kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        if not self.sinks:
            return super().crop(tokens_to_remove)
        if self.is_initialized and self.cumulative_length > self.keys.shape[-2]:
            raise RuntimeError("Echo window cache with sink tokens: tokens between the sinks and the window were "
                               "dropped, so it cannot be cropped")
        DynamicLayer.crop(self, tokens_to_remove)
        self.cumulative_length = self.keys.shape[-2] if self.is_initialized else 0


class EchoCacheState(GraftState):
    """The Echo graft's state in a `GraftCache`: ``layers[i]`` is grafted layer i's `EchoStateLayer`.

    Cropping is refused once a layer holds statistics: they are sums over every token seen, and a sum can't
    give back the tokens it absorbed.
    """

    def __init__(self, echo_layers: Iterable[int]) -> None:
        self.layers: dict[int, EchoStateLayer] = {index: EchoStateLayer() for index in echo_layers}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers.values():
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers.values():
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers.values():
            layer.batch_select_indices(indices)

    def crop_refusal(self, length: int) -> str | None:
        if any(layer.is_initialized for layer in self.layers.values()):
            return "the Echo statistics are sums over every token seen and cannot give tokens back"
        return None

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.reset()

    def nbytes(self, layer_idx: int | None = None) -> int:
        """Bytes of Echo state held (one grafted layer, or all)."""
        layers = self.layers.values() if layer_idx is None else [self.layers[layer_idx]]
        return sum(layer.nbytes() for layer in layers)


class EchoCache(GraftCache):
    """A `GraftCache` holding only an Echo graft's state (``echo[i]``: grafted layer i's `EchoStateLayer`) and its
    window layers (``window_layers``: index -> an `EchoWindowLayer`, or its window). ``EchoGraft.make_cache()`` builds one; a stack
    generates with the one `GraftCache` of `GraftModel.make_cache`, which holds the same parts.
    """

    def __init__(self, config, echo_layers: Iterable[int], window_layers: dict[int, int | EchoWindowLayer] | None = None):
        layers = {index: layer if isinstance(layer, EchoWindowLayer) else EchoWindowLayer(sliding_window=layer)
                  for index, layer in (window_layers or {}).items()}
        super().__init__(config, {STATE_KEY: EchoCacheState(echo_layers)}, layers)

    @property
    def echo(self) -> dict[int, EchoStateLayer]:
        return self.graft_states[STATE_KEY].layers

    def echo_state_bytes(self, layer_idx: int | None = None) -> int:
        """Bytes of Echo state held (one grafted layer, or all)."""
        return self.graft_states[STATE_KEY].nbytes(layer_idx)
