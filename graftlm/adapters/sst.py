"""SST sticky-note memory (METHODS.md section 1; "State Stream Transformer V2", arXiv 2605.00206).

Per grafted layer l a state ``s_l`` in R^d is carried from position t-1 to t and blended into the FFN
input (METHODS.md section 1, "Blend")::

    u_t = (1 - c_l) * h_t + c_l * s_{l,t-1},      c_l = g_l * a_l
    a_l = lo + (hi - lo) * fold(blend_unfolded_l),  g_l = fold(gate_unfolded_l)
    f_t = FFN(u_t)                                 (Gemma: pre-norm, MLP, post-norm; Llama: norm, MLP)
    s_{l,t} = f_t                                  (``state_source="residual"``: s_{l,t} = h_t + f_t)

``h_t`` [B, T, d] is the residual stream after attention (the input of the FFN's input norm); the layer
still adds ``f_t`` to ``h_t``, so only the FFN sees the blend. ``a_l`` [d] is bounded to
``[blend_min, blend_max]`` as in the paper; ``s_{l,-1} = 0`` and padding positions carry no state.

Exact base reproduction at init (a reconstruction, the paper starts from its own init): ``g_l`` is one
learned scalar gate per layer in [0, 1], exactly 0 at init, so a fresh adapter is the base model bit for
bit; ``g_l = 1`` is the paper's blend. The gates add L parameters to the paper's L x d blend; both are
reported.

No parameter can die: ``fold`` (`fold_unit`) reflects its argument into [0, 1] (a triangle wave of period
2), so ``|d fold / dx| = 1`` everywhere. A clamp has zero gradient past its bound and a sigmoid's vanishes
where it saturates; with ``fold`` a parameter pushed past a bound comes back inside with its gradient
intact. d loss / d g_l = a_l (s - h) . dL/du with ``a_l >= blend_min > 0``, so every grafted layer's gate
receives gradient at every value, 0 included (there the blend weights' own gradient is 0, and returns as
soon as the gate moves).

Forward modes (the recurrence runs through the pretrained FFN, so it can't be a scan):

* ``two_pass`` (training default and default prefill): pass 1 is the model without the blend, no grad,
  recording every grafted layer's state; shifted one position these approximate the states; pass 2
  runs with the blend and with grad. The approximation error is O(a^2). In a stack, pass 1 runs the other
  grafts too (continuing a cache: on a deep copy of it, every graft's state included), so the states it
  records are the stacked model's.
* ``exact``: each grafted layer runs its FFN token by token, carrying the state (the recurrence above,
  exactly). Used for decode (one token), on request for prefill, and for tests.

Generation: the states live in the `GraftCache` the model is called with (`SSTCacheState`: layer -> [B, d];
on another transformers cache as its attribute ``graftlm_sst``, exact for greedy decoding only), beside the
KV cache; decode is the exact recurrence. Beam search reorders the states; crop needs past recording
(`SSTCacheState`).

dtypes (`graftlm.dtype_policy`): the blend weights and gates are float32; the blend is computed in
float32 and handed to the FFN in the base's dtype; the states are FFN outputs, kept in the base's dtype.
Decode makes no host syncs.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft import Graft
from graftlm.adapters.graft_cache import GraftState, missing_state_error, state_of
from graftlm.adapters.lora import DEFAULT_TARGET_MODULES
from graftlm.adapters.registry import register_graft
from graftlm.dtype_policy import to_base, to_graft
from graftlm.patches.cache_kwarg import cache_from_kwargs, cache_from_output, with_cache

STATE_KEY = "sst"  # the graft's key in GraftCache.graft_states (its graft type)


@dataclass
class SSTConfig(GraftConfig):
    """SST sticky-note memory: a per-layer state blended into the FFN input (METHODS.md section 1)."""

    graft_type = "sst"

    blend_min: float = field(
        default=0.015, metadata={"help": "Lower bound of the per-channel blend weight a (above 0: at a = 0 and a "
                                         "closed gate neither would receive gradient).", "gt": 0.0, "lt": 1.0}
    )
    blend_max: float = field(
        default=0.10, metadata={"help": "Upper bound of the per-channel blend weight a.", "gt": 0.0, "max": 1.0}
    )
    blend_init: float = field(
        default=0.03, metadata={"help": "Initial blend weight a (strictly inside the bounds).", "gt": 0.0, "lt": 1.0}
    )
    state_source: Literal["ffn_output", "residual"] = field(
        default="ffn_output",
        metadata={"help": "The new state: the FFN branch output f_t, or the layer output h_t + f_t."},
    )
    train_mode: Literal["two_pass", "exact"] = field(
        default="two_pass", metadata={"help": "Forward used in training: two-pass approximation or exact."}
    )
    prefill_mode: Literal["two_pass", "exact"] = field(
        default="two_pass", metadata={"help": "Forward used at inference for more than one token."}
    )
    max_deliberation: int = field(
        default=4, metadata={"help": "Most repeats of the forward pass at the first answer position.", "min": 1}
    )
    lora_r: int = field(
        default=0, metadata={"help": "Rank of an optional peft LoRA on the base (0: blend only).", "min": 0}
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r).", "gt": 0.0}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Modules LoRA adapts (a single name is a one-item list).", "non_empty": True},
    )
    blend_lr: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the blend weights and gates (None: the recipe's train.lr, which "
                          "the optional LoRA always uses).", "gt": 0.0},
    )

    def validate(self) -> None:
        if not self.blend_min < self.blend_max:
            raise self.error("blend_max", f"must be above blend_min={self.blend_min}, got {self.blend_max}")
        if not self.blend_min < self.blend_init < self.blend_max:
            raise self.error("blend_init", f"must lie strictly between blend_min={self.blend_min} and "
                                           f"blend_max={self.blend_max}, got {self.blend_init}")


class _Run:
    """What one top-level forward does in the hooks: mode, per-layer states, recorded states."""

    def __init__(self, mode: str, token_mask: torch.Tensor | None, cache_state: SSTCacheState | None = None,
                 initial: dict[int, torch.Tensor] | None = None, states: dict[int, torch.Tensor] | None = None,
                 coefficients: torch.Tensor | None = None):
        self.mode = mode  # "record" | "provided" | "sequential"
        self.coefficients = coefficients  # c [L_g, d] computed once (no-grad forwards), else None
        self.token_mask = token_mask  # [B, T] float, 1 at real tokens
        self.cache_state = cache_state  # the generation cache's SST state, updated after the forward
        self.stored = False  # the states went to the cache (once: a checkpointing recompute stores nothing)
        self.initial = initial or {}  # layer -> [B, d] state before the first position
        self.states = states or {}  # layer -> [B, T, d] shifted states ("provided")
        self.recorded: dict[int, torch.Tensor] = {}  # layer -> [B, T, d] ("record") or [B, d] (last position)
        self.chunk_states: dict[int, torch.Tensor] | None = None  # layer -> [B, T, d], kept for a recording cache
        self.residual_in: dict[int, torch.Tensor] = {}


class SSTCacheState(GraftState):
    """SST's state in a `GraftCache` (or, as ``graftlm_sst``, on another cache: `state_of`).

    ``states``: layer -> the state [B, d] carried out of the last position (0 at padding). While past
    recording is on (`activate_past_recording`: transformers' assisted decoding, SST deliberation)
    ``history`` also keeps layer -> [B, K, d], the states carried out of positions ``start`` ..
    ``start + K - 1``, so `crop_to` can go back to any of them; without it a crop is refused (the last
    state alone can't give an earlier one back). Every crop trims the history to the new last state, as
    transformers trims a recording linear-attention layer (a crop never goes back past an earlier one).
    """

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.history: dict[int, torch.Tensor] | None = None
        self.start = 0

    def update(self, states: dict[int, torch.Tensor], chunk_states: dict[int, torch.Tensor] | None) -> None:
        """After a forward: the last position's states, and (recording) every position's [B, T, d]."""
        self.states = dict(states)
        if self.history is not None and chunk_states is not None:
            self.history = {layer: torch.cat([self.history[layer], chunk], dim=1) if layer in self.history else chunk
                            for layer, chunk in chunk_states.items()}

    @property
    def recording(self) -> bool:
        return self.history is not None

    def map_rows(self, fn) -> None:
        self.states = {layer: fn(state) for layer, state in self.states.items()}
        if self.history is not None:
            self.history = {layer: fn(states) for layer, states in self.history.items()}

    def activate_past_recording(self, length: int) -> None:
        if self.history is None:
            self.history = {layer: state[:, None] for layer, state in self.states.items()}
            self.start = length - 1 if self.states else length

    def deactivate_past_recording(self) -> None:
        self.history, self.start = None, 0

    def crop_refusal(self, length: int) -> str | None:
        if not self.states:
            return None
        if self.history is None:
            return ("SST keeps only the last position's state; call cache.activate_past_recording() before the "
                    "tokens to be cropped (transformers does for assisted decoding)")
        if length > 0 and length - 1 < self.start:
            return f"SST recorded its states from position {self.start} on, not back to position {length - 1}"
        return None

    def crop_to(self, length: int, removed: int) -> None:
        if self.history is None:
            return
        if length == 0:
            self.states, self.history, self.start = {}, {}, 0
            return
        at = length - 1 - self.start
        self.states = {layer: states[:, at] for layer, states in self.history.items()}
        self.history = {layer: states[:, at:at + 1] for layer, states in self.history.items()}
        self.start = length - 1

    def reset(self) -> None:
        self.states, self.start = {}, 0
        if self.history is not None:
            self.history = {}

    def nbytes(self) -> int:
        tensors = list(self.states.values()) + list((self.history or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)


def fold_unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` reflected into [0, 1] (a triangle wave of period 2: 0 at even, 1 at odd integers), elementwise.
    The slope is +1 or -1 everywhere (the kinks take the rising side), so the gradient never vanishes."""
    r = torch.remainder(x, 2.0)
    return torch.where(r <= 1.0, r, 2.0 - r)


class SSTGraft(Graft):
    """Blend coordinates ``blend_unfolded`` [L_g, d], gate coordinates ``gate_unfolded`` [L_g], and a halting
    probe (buffers). The run log gets per-layer gate, blend and gradient statistics (`training_statistics`)."""

    def __init__(self, config: SSTConfig, base_model: nn.Module, patch):
        super().__init__(config, base_model, patch)
        if not config.blend_min < config.blend_init < config.blend_max:
            raise ValueError(f"blend_init {config.blend_init} must lie inside ({config.blend_min}, {config.blend_max})")
        d = base_model.config.hidden_size
        n = len(self.layer_indices)
        fraction = (config.blend_init - config.blend_min) / (config.blend_max - config.blend_min)
        self.blend_unfolded = nn.Parameter(torch.full((n, d), fraction))
        self.gate_unfolded = nn.Parameter(torch.zeros(n))
        # The halting probe is fitted separately (graftlm.adapters.sst_deliberation), not by the LM loss.
        self.register_buffer("probe_weight", torch.zeros(config.max_deliberation, d))
        self.register_buffer("probe_bias", torch.zeros(config.max_deliberation))
        self.row_of = {layer: row for row, layer in enumerate(self.layer_indices)}
        self._grad_squares: dict[str, torch.Tensor] = {}  # per-layer squared gradient norms, latest backward
        self._run: _Run | None = None
        self._internal = False
        self._in_branch = False

    # -- parameters ------------------------------------------------------------------------------
    def blend_weights(self) -> torch.Tensor:
        """a [L_g, d] in [blend_min, blend_max] (METHODS.md section 1, bounded blend)."""
        lo, hi = self.config.blend_min, self.config.blend_max
        return lo + (hi - lo) * fold_unit(self.blend_unfolded)

    def gates(self) -> torch.Tensor:
        """g [L_g] in [0, 1]: 0 is the base model, 1 the paper's blend."""
        return fold_unit(self.gate_unfolded)

    def blend_coefficients(self) -> torch.Tensor:
        """c = g * a [L_g, d]: the weight of the state in the FFN input."""
        return self.gates()[:, None] * self.blend_weights()

    @torch.no_grad()
    def set_blend(self, a: float | torch.Tensor, gate: float | None = None) -> None:
        """Set every blend weight to ``a`` (clamped inside the bounds) and optionally every gate (in [0, 1])."""
        lo, hi = self.config.blend_min, self.config.blend_max
        fraction = ((torch.as_tensor(a, dtype=torch.float32) - lo) / (hi - lo)).clamp(0.0, 1.0)
        self.blend_unfolded.copy_(fraction.expand_as(self.blend_unfolded))
        if gate is not None:
            if not 0.0 <= gate <= 1.0:
                raise ValueError(f"gate must lie in [0, 1], got {gate}")
            self.gate_unfolded.fill_(gate)

    # -- training: learning rates and the logged statistics ----------------------------------------
    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optional LoRA at the recipe's ``lr`` (first: the loop logs the first group's rate), then the
        blend and gates at ``blend_lr`` (the paper trains them jointly with a QLoRA adapter)."""
        blend = {"params": [self.blend_unfolded, self.gate_unfolded], "lr": self.config.blend_lr or lr}
        return ([{"params": self.external_parameters(), "lr": lr}] if self.lora is not None else []) + [blend]

    def training_statistics(self) -> dict[str, torch.Tensor]:
        """Per grafted layer l: ``sst_gate/L<l>`` (g_l), ``sst_blend/L<l>`` (the mean over channels of
        c_l = g_l a_l, the state's weight in the FFN input) and ``sst_grad/L<l>`` (the norm of the gradient
        of the layer's gate and blend coordinates in the latest backward; 0 before the first), as float32
        device scalars: no host sync here, the loop reads them with its log line."""
        with torch.no_grad():
            zeros = torch.zeros_like(self.gate_unfolded)
            grad = (self._grad_squares.get("gate", zeros) + self._grad_squares.get("blend", zeros)).sqrt()
            rows = torch.stack([self.gates(), self.blend_coefficients().mean(-1), grad.to(zeros.device)]).float()
        return {f"sst_{name}/L{layer}": rows[i, j] for i, name in enumerate(("gate", "blend", "grad"))
                for j, layer in enumerate(self.layer_indices)}

    def _keep_grad_squares(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            squares = grad.detach().float().pow(2)
            self._grad_squares[name] = squares.sum(-1) if squares.ndim == 2 else squares

        return hook

    # -- install ---------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.base_model
        if self.config.lora_r > 0:
            self.attach_lora(self.config.lora_r, self.config.lora_alpha, self.config.lora_target_modules)
        self.add_hook(self.gate_unfolded.register_hook(self._keep_grad_squares("gate")))
        self.add_hook(self.blend_unfolded.register_hook(self._keep_grad_squares("blend")))
        self.add_hook(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self.add_hook(model.register_forward_hook(self._after_model, with_kwargs=True))
        layers = self.patch.decoder_layers(model)
        for layer_index in self.layer_indices:
            layer = layers[layer_index]
            self.add_hook(self.patch.ffn_input_norm(layer).register_forward_pre_hook(self._blend_hook(layer_index)))
            self.add_hook(self.patch.ffn_output_module(layer).register_forward_hook(self._state_hook(layer_index)))

    # -- the top-level forward: choose the mode, run pass 1 when two-pass ---------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self._internal or not self.active:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        batch, length = reference.shape[:2]
        token_mask = _token_mask(kwargs.get("attention_mask"), batch, length, reference.device)
        cache = cache_from_kwargs(kwargs)
        state = state_of(cache, STATE_KEY, make=SSTCacheState)
        if cache is not None and state is None:
            raise missing_state_error("SST", cache)
        initial = state.states if state is not None else {}
        mode = self.config.train_mode if module.training else self.config.prefill_mode
        # Without grad (decode, evaluation) c is computed once per forward, not once per layer; with grad it
        # is computed inside each layer's hook, where gradient checkpointing's recomputation finds it.
        coefficients = None if torch.is_grad_enabled() else self.blend_coefficients()
        if length == 1 or mode == "exact":
            self._run = _Run("sequential", token_mask, state, initial, coefficients=coefficients)
            return
        recorded = self._first_pass(module, kwargs, input_ids, embeds, cache)
        states = {}
        for layer_index in self.layer_indices:
            source = recorded.get(layer_index)
            if source is None:
                states[layer_index] = None
                continue
            first = initial.get(layer_index)
            first = torch.zeros_like(source[:, 0]) if first is None else first.to(source.dtype)
            states[layer_index] = torch.cat([first[:, None], source[:, :-1]], dim=1)
        self._run = _Run("provided", token_mask, state, initial, states, coefficients)
        return

    def _first_pass(self, module, kwargs, input_ids, embeds, cache) -> dict[int, torch.Tensor]:
        """Pass 1 (METHODS.md section 1, two-pass training): the model without the blend, no grad."""
        if not torch.is_grad_enabled() and bool((self.gates() == 0).all()):
            return {}  # the blend is closed: the states can't change the output
        past = copy.deepcopy(cache) if cache is not None and cache.get_seq_length() > 0 else None
        batch, length = (input_ids if input_ids is not None else embeds).shape[:2]
        device = (input_ids if input_ids is not None else embeds).device
        record = _Run("record", _token_mask(kwargs.get("attention_mask"), batch, length, device))
        previous, self._run, self._internal = self._run, record, True
        try:
            with torch.no_grad():
                module(input_ids=input_ids, inputs_embeds=embeds, attention_mask=kwargs.get("attention_mask"),
                       position_ids=kwargs.get("position_ids"), **with_cache({}, past), use_cache=past is not None,
                       logits_to_keep=1)
        finally:
            self._run, self._internal = previous, False
        return record.recorded

    def _after_model(self, module, args, kwargs, output):
        """Store the last position's states in the cache's `SSTCacheState`. The run stays current until the next
        forward: gradient checkpointing re-runs the layer hooks during backward and must see the same states."""
        run = self._run
        if self._internal or run is None or run.stored:
            return
        state = run.cache_state
        if state is None:  # the model made a cache of its own (use_cache): the states ride on it (`state_of`)
            state = state_of(cache_from_output(output), STATE_KEY, make=SSTCacheState)
        if state is not None:
            state.update(run.recorded, run.chunk_states)
        run.stored = True
        return

    # -- per-layer hooks -----------------------------------------------------------------------------
    def _blend_hook(self, layer_index: int):
        row = self.row_of[layer_index]

        def hook(module, args):
            run = self._run
            if self._in_branch or run is None or not self.active:
                return None
            h = args[0]
            if self.config.state_source == "residual":
                run.residual_in[layer_index] = h
            if run.mode == "record":
                return None
            coefficients = run.coefficients if run.coefficients is not None else self.blend_coefficients()
            coefficient = coefficients[row]
            if run.mode == "provided":
                states = run.states.get(layer_index)
                if states is None:
                    return None
                return (blend(h, states, coefficient),) + args[1:]
            return (self._sequential_inputs(layer_index, h, coefficient, run),) + args[1:]

        return hook

    def _sequential_inputs(self, layer_index: int, h: torch.Tensor, coefficient: torch.Tensor, run: _Run):
        """The exact recurrence over the positions of ``h`` [B, T, d]; returns the FFN inputs u [B, T, d]."""
        state = run.initial.get(layer_index)
        state = torch.zeros_like(h[:, 0]) if state is None else state.to(h.dtype)
        if h.shape[1] == 1:  # one decode step: nothing to carry inside the chunk
            return blend(h, state[:, None], coefficient)
        mask = run.token_mask.to(h.dtype)
        inputs = []
        for t in range(h.shape[1]):
            u_t = blend(h[:, t], state, coefficient)
            inputs.append(u_t)
            if t + 1 < h.shape[1]:
                f_t = self._ffn_branch(layer_index, u_t[:, None])[:, 0]
                new_state = h[:, t] + f_t if self.config.state_source == "residual" else f_t
                state = new_state * mask[:, t, None]
        return torch.stack(inputs, dim=1)

    def _ffn_branch(self, layer_index: int, u: torch.Tensor) -> torch.Tensor:
        """The layer's FFN branch on u [B, T, d] without this graft's hooks: what it adds to the residual."""
        layer = self.patch.decoder_layers(self.base_model)[layer_index]
        self._in_branch = True
        try:
            out = self.patch.mlp(layer)(self.patch.ffn_input_norm(layer)(u))
            post = self.patch.ffn_output_norm(layer)
            return post(out) if post is not None else out
        finally:
            self._in_branch = False

    def _state_hook(self, layer_index: int):
        def hook(module, args, output):
            run = self._run
            if self._in_branch or run is None or not self.active:
                return
            state = output
            if self.config.state_source == "residual":
                state = run.residual_in[layer_index] + output
            if run.mode == "record":
                run.recorded[layer_index] = (state * run.token_mask.to(state.dtype)[..., None]).detach()
                return
            # only the last position's state is carried on; a recording cache keeps every position's
            run.recorded[layer_index] = state[:, -1] * run.token_mask[:, -1:].to(state.dtype)
            if not run.stored and run.cache_state is not None and run.cache_state.recording:
                if run.chunk_states is None:
                    run.chunk_states = {}
                run.chunk_states[layer_index] = state * run.token_mask.to(state.dtype)[..., None]
            return

        return hook

    # -- the states held by a generation cache ----------------------------------------------------------
    @staticmethod
    def cache_states(cache) -> dict[int, torch.Tensor]:
        """Per grafted layer: the state [B, d] carried into the next position."""
        state = state_of(cache, STATE_KEY)
        return dict(state.states) if state is not None else {}

    @staticmethod
    def set_cache_states(cache, states: dict[int, torch.Tensor]) -> None:
        """Replace the states carried into the next position (deliberation repeats a position with them)."""
        state = state_of(cache, STATE_KEY, make=SSTCacheState)
        if state is None:
            raise missing_state_error("SST", cache)
        state.states = dict(states)
        if state.history is not None:  # the repeated position's recorded state is the one set here
            state.history = {layer: torch.cat([h[:, :-1], states[layer][:, None]], dim=1) if layer in states else h
                             for layer, h in state.history.items()}

    def make_cache_state(self) -> SSTCacheState:
        return SSTCacheState()

    @contextmanager
    def forward_mode(self, mode: Literal["two_pass", "exact"]):
        """Temporarily force the forward mode of training and inference (e.g. exact for evaluation)."""
        saved = (self.config.train_mode, self.config.prefill_mode)
        self.config.train_mode = self.config.prefill_mode = mode
        try:
            yield
        finally:
            self.config.train_mode, self.config.prefill_mode = saved


def blend(h: torch.Tensor, state: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """u = h + c (s - h) = (1 - c) h + c s, computed in float32 and returned in h's dtype
    (`graftlm.dtype_policy`): h, state [..., d] in the base's dtype, coefficient [d] float32.
    With c = 0 it is h bit for bit in any dtype."""
    return to_base(torch.lerp(to_graft(h), to_graft(state), coefficient), h)


def _token_mask(attention_mask: Any, batch: int, length: int, device) -> torch.Tensor:
    """[B, T] 1.0 at real tokens of the current chunk (the last T columns of a 2-D padding mask)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        return attention_mask[:, -length:].to(device=device, dtype=torch.float32)
    return torch.ones(batch, length, device=device)


register_graft(SSTConfig, SSTGraft)
