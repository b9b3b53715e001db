"""Echo graft (METHODS.md section 3): a fixed-size ridge-regression recall state beside or instead of a
frozen layer's attention.

Per grafted layer, over the attention's input x [B, T, d] (the output of ``input_layernorm``, i.e. the
attention module's ``hidden_states``: the same normalised stream the frozen q/k/v projections read):

    z = W_k x, q = W_q x      [B, H, T, r]      (z scaled by its running max norm inside the operator)
    v = W_v x                 [B, H, T, P]
    y = eta C G^-1 (M G^-1)^K q                  (``graftlm.kernels.echo``; gamma clamped to [1, 1.5])
    echo(x) = W_o y           [B, T, d]          W_o zero-initialised

Two modes:

* ``parallel``: attention output + echo(x). A forward hook on the attention module adds the branch to the
  module's output ``(attn_out [B, T, d], weights)``. On Gemma 3 that output then goes through
  ``post_attention_layernorm``, so the branch sits *before* that norm (it is normalised with the
  attention output, as a second attention head would be). With W_o = 0 the logits are the base's exactly.
* ``replace`` (in ``target_layers``): the layer's attention becomes a local sliding-window attention
  (the frozen q/k/v/o weights restricted to the last ``window`` tokens, the query's own included, and to
  each row's first ``sink_tokens`` real tokens: the attention sinks of StreamingLLM, arXiv 2309.17453, on
  full-attention layers only) plus the Echo branch, so the layer keeps no KV cache beyond the window and
  the sinks at generation. Without the sinks a window loses the mass the frozen heads put on the first
  token: on SmolLM2 with 26 of 30 layers cut to 64 tokens, +1.42 nats of held-out NLL against +0.19 with
  one sink (``benchmarks/echo_sinks.py``). Training ramps from
  the frozen attention to it: ``out = (1 - ramp) full_attention + ramp (window_attention + echo)``
  (``replace_ramp``; 0 with W_o = 0 is the base exactly; generation with ramp = 1 holds only the window;
  ``ramp_fraction`` schedules it in the recipes loop through `EchoGraft.on_train_step`).
  The window attention is an attention function registered through ``patch.register_attention`` and
  switched on for the whole model: it calls the model's previous implementation unchanged for every
  layer it does not replace, so projections, norms, RoPE and cache updates stay the base model's code.
  The attention's ``sliding_window`` (Gemma 3 local layers) further narrows the window.

Training: the LM loss, plus in replace mode an optional LoLCATs-style distillation (arXiv 2410.10254)
``distill_weight * mean_layers MSE(o_proj(window_attn) + echo(x), o_proj(full_attn).detach())`` through
`EchoGraft.training_loss`, and optionally the same transfer in head space, before either output projection:
``head_distill_weight * mean_layers MSE(y, (full_attn - window_attn).detach())`` with y [B, H, T, P] the
readout and the attentions [B, H, T, hd] per query head (H, P = the model's heads, head_dim). The output term
reaches W_q, W_k, W_v only through W_o, which starts at 0; the head term trains them from the first step.
Generation: the graft's state (`EchoCacheState`, ``echo_cache.py``) and window
layers live in the one `GraftCache` that `GraftModel.generate` builds (``EchoGraft.make_cache()``: an
`EchoCache`, holding only them); beam search reorders the state, crop is refused; batched generation with
left padding is exact per row (see that module).

dtypes and host syncs (`graftlm.dtype_policy`): the branch's parameters, projections and statistics are
float32 (``stats_dtype``; Kahan-compensated decode sums) with autocast off, whatever the base's dtype;
the branch's output is added in the base's dtype. No layer reads the device: the padding mask is read
once per forward, before the layers run (only when a 2-D mask is passed), and decode knows on the host
when a chunk starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.echo_cache import (
    STATE_KEY,
    EchoCache,
    EchoCacheState,
    EchoSettings,
    EchoWindowLayer,
    echo_continue,
    echo_prefill,
    echo_sequence,
    only_trailing_padding,
)
from graftlm.adapters.graft import Graft
from graftlm.adapters.graft_cache import state_of
from graftlm.adapters.registry import register_graft
from graftlm.dtype_policy import full_precision, to_base
from graftlm.patches.cache_kwarg import cache_from_kwargs, with_cache

LayerObserver = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]
STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}
MODES = ("parallel", "replace")


@dataclass
class EchoConfig(GraftConfig):
    """Echo recall state (METHODS.md section 3) grafted beside or instead of attention."""

    graft_type = "echo"

    mode: str = field(default="parallel", metadata={
        "help": "'parallel': frozen attention + Echo branch; 'replace': window attention + Echo branch "
                "instead of the attention of target_layers (no KV cache beyond the window).", "choices": MODES})
    num_heads: int | None = field(default=None, metadata={
        "help": "Echo heads H per layer; None = the model's attention heads.", "min": 1})
    rank: int = field(default=16, metadata={"help": "Key/query rank r per head (state is O(H r^2)).", "min": 1})
    value_dim: int | None = field(default=None, metadata={
        "help": "Value size P per head; None = the model's head_dim.", "min": 1})
    power: int = field(default=2, metadata={
        "help": "K, the power of the spectral Koopman filter (M G^-1)^K; 0 = plain ridge recall.", "min": 0})
    chunk_size: int = field(default=64, metadata={
        "help": "Chunk L: a token reads the statistics of the chunks before its own (train and decode).", "min": 1})
    eps: float = field(default=1e-3, metadata={
        "help": "Ridge eps added to G (keys have unit running max norm).", "gt": 0.0})
    stats_dtype: str = field(default="float32", metadata={
        "help": "dtype of the running statistics and solves: 'float32' (default; Kahan-compensated decode "
                "sums, within 2e-4 of float64 on 32k real hidden states: benchmarks/echo_stats_dtype.py) "
                "or 'float64' (slow on most GPUs).",
        "choices": tuple(STATS_DTYPES)})
    window: int | None = field(default=None, metadata={
        "help": "Replace mode: local attention window in tokens, the query's own included; None = chunk_size.",
        "min": 1})
    sink_tokens: int = field(default=4, metadata={
        "help": "Replace mode: the first real tokens of each row that the window attention always attends "
                "besides its window (the attention sinks of StreamingLLM, arXiv 2309.17453); the cache keeps "
                "them beside the window. Saved adapters without this field load with 0, as they were trained.",
        "min": 0})
    replace_ramp: float = field(default=1.0, metadata={
        "help": "Replace mode: out = (1 - ramp) full attention + ramp (window attention + Echo); schedule it "
                "from 0 to 1 in training (graft.replace_ramp); generation holds only the window when 1.",
        "min": 0.0, "max": 1.0})
    distill_weight: float = field(default=0.0, metadata={
        "help": "Replace mode: weight of the MSE between each layer's window attention + Echo output and "
                "its frozen full-attention output (LoLCATs); 0 = LM loss only.", "min": 0.0})
    head_distill_weight: float = field(default=0.0, metadata={
        "help": "Replace mode: weight of the per-head MSE between the Echo readout y [B, H, T, P] (before W_o) and "
                "what the window misses in head space, full_attn - window_attn per query head (before o_proj): "
                "LoLCATs' attention transfer on the heads, so W_q, W_k, W_v, gamma and eta learn from the first "
                "step while the zero-initialised W_o cannot pass them a gradient yet. Needs num_heads = the model's "
                "attention heads and value_dim = its head_dim; 0 = off.", "min": 0.0})
    echo_branch: bool = field(default=True, metadata={
        "help": "False: no Echo branch and no Echo parameters (replace mode only: the window attention alone, "
                "the control that isolates the Echo state; stack a LoRA to give it a trainable budget)."})
    ramp_fraction: float = field(default=0.0, metadata={
        "help": "Replace mode, recipes training: over this fraction of the steps the ramp rises linearly "
                "from 0 to replace_ramp (Graft.on_train_step), then holds; 0 = replace_ramp throughout.",
        "min": 0.0, "max": 1.0})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EchoConfig:
        """Saved values; a config saved before ``sink_tokens`` existed had no sinks, and loads without them."""
        if isinstance(values, dict) and "sink_tokens" not in values:
            values = {**values, "sink_tokens": 0}
        return super().from_dict(values)

    def validate(self) -> None:
        if self.distill_weight > 0 and self.mode != "replace":
            raise self.error("distill_weight", "needs mode='replace' (in parallel mode the frozen attention output "
                                               f"is already part of the layer's output), got {self.distill_weight}")
        if self.head_distill_weight > 0 and (self.mode != "replace" or not self.echo_branch):
            raise self.error("head_distill_weight", "needs mode='replace' with the Echo branch (it compares the "
                                                    f"branch's readout with what the window misses), got "
                                                    f"{self.head_distill_weight} with mode={self.mode!r}, "
                                                    f"echo_branch={self.echo_branch}")
        if not self.echo_branch and self.mode != "replace":
            raise self.error("echo_branch", "false needs mode='replace' (in parallel mode there would be nothing "
                                            f"to graft), got mode={self.mode!r}")
        if self.ramp_fraction > 0 and self.mode != "replace":
            raise self.error("ramp_fraction", f"needs mode='replace', got {self.ramp_fraction} with "
                                              f"mode={self.mode!r}")


class EchoBranch(nn.Module):
    """One layer's Echo parameters: W_q, W_k [d -> H r], W_v [d -> H P], W_o [H P -> d] (zero), gamma, eta [H]."""

    def __init__(self, hidden_size: int, heads: int, rank: int, value_dim: int):
        super().__init__()
        self.heads, self.rank, self.value_dim = heads, rank, value_dim
        self.w_q = nn.Linear(hidden_size, heads * rank, bias=False)
        self.w_k = nn.Linear(hidden_size, heads * rank, bias=False)
        self.w_v = nn.Linear(hidden_size, heads * value_dim, bias=False)
        self.w_o = nn.Linear(heads * value_dim, hidden_size, bias=False)
        nn.init.zeros_(self.w_o.weight)
        self.gamma = nn.Parameter(torch.ones(heads))
        self.eta = nn.Parameter(torch.ones(heads))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> z, q [B, H, T, r] and v [B, H, T, P]."""
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, self.heads, -1).transpose(1, 2)
        return split(self.w_k(x)), split(self.w_q(x)), split(self.w_v(x))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, H, T, P] -> W_o y [B, T, d]."""
        batch, _, length, _ = y.shape
        return self.w_o(y.transpose(1, 2).reshape(batch, length, -1))


@dataclass
class ForwardContext:
    """What the decoder's forward was called with, read by the per-layer hooks of that forward (and of its
    gradient-checkpointing recompute, which re-runs the layers but not the decoder)."""

    token_mask: torch.Tensor | None = None  # [B, past + T] bool, False = padding; None = no mask given
    chunk_padded: bool = False  # the forward's own T tokens include padding (read once per forward)
    trailing_padding: bool = True  # ... and that padding only follows real tokens (right padding)
    past_length: int = 0
    distilling: bool = False
    sink_span: int = 0  # replace mode: positions that hold every row's first sink_tokens real tokens


class EchoGraft(Graft):
    """Echo branches on the target layers; see the module docstring for the two modes."""

    def __init__(self, config: EchoConfig, base_model: nn.Module, patch):
        super().__init__(config, base_model, patch)
        base = base_model.config
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
        heads = config.num_heads or base.num_attention_heads
        self.branches = nn.ModuleDict({
            str(i): EchoBranch(base.hidden_size, heads, config.rank, config.value_dim or head_dim)
            for i in (self.layer_indices if config.echo_branch else [])
        })
        if config.head_distill_weight > 0 and (heads, config.value_dim or head_dim) != (base.num_attention_heads,
                                                                                    head_dim):
            raise ValueError(
                f"EchoConfig.head_distill_weight: the readout is compared head by head with the attention's output, "
                f"so it needs num_heads = {base.num_attention_heads} and value_dim = {head_dim} (the model's), got "
                f"num_heads={heads}, value_dim={config.value_dim or head_dim}")
        self.settings = EchoSettings(config.power, config.chunk_size, config.eps, STATS_DTYPES[config.stats_dtype])
        self.window = config.window or config.chunk_size
        self.replace_ramp = config.replace_ramp
        types = patch.layer_types(base_model)  # a sliding layer (Gemma 3 local) never had sinks: none added
        self.sinks = {i: config.sink_tokens if config.mode == "replace" and types[i] == "full_attention" else 0
                      for i in self.layer_indices}
        self.query_block = 128  # window attention: queries per block (memory O(T window))
        self._context = ForwardContext()
        self._distill_terms: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # (output, head) per layer
        self._observer: LayerObserver | None = None
        self._pending: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._replaced: dict[nn.Module, int] = {}
        self._previous_attention = ""

    @property
    def replaces(self) -> bool:
        return self.config.mode == "replace"

    # -- wiring ----------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.base_model
        layers = self.patch.decoder_layers(model)
        decoder = self.patch.decoder(model)
        self.add_hook(decoder.register_forward_pre_hook(self._capture_context, with_kwargs=True))
        for index in self.layer_indices:
            attention = self.patch.attention(layers[index])
            self.add_hook(attention.register_forward_hook(self._make_attention_hook(index), with_kwargs=True))
        if self.replaces:
            self._replaced = {self.patch.attention(layers[i]): i for i in self.layer_indices}
            self._install_window_attention()

    def _install_window_attention(self) -> None:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        model = self.base_model
        previous = model.config._attn_implementation
        name = f"graftlm_echo_{id(self):x}"
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(previous)  # the base layers keep their masks
        self.patch.register_attention(name, self._attention, mask_fn)
        self._previous_attention = self.patch.set_attention_implementation(model, name)

        def undo() -> None:
            self.patch.set_attention_implementation(model, self._previous_attention)
            self.patch.unregister_attention(name)

        self.on_remove(undo)

    def _capture_context(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Once per forward, before any layer runs: whether this forward's own tokens include padding.
        That is the only host read of the mask (a decode step under ``generate``, which passes a mask,
        makes this one sync per step and none per layer; without a mask, none)."""
        mask = kwargs.get("attention_mask")
        cache = cache_from_kwargs(kwargs)
        token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        length = reference.shape[1] if reference is not None else (args[0].shape[1] if args else None)
        chunk_padded, interior, lead = False, False, 0
        sinks = max(self.sinks.values(), default=0)
        if token_mask is not None:
            chunk = token_mask if length is None or length > token_mask.shape[1] else token_mask[:, -length:]
            padded = ~chunk.all()
            flags = [padded, padded & ~only_trailing_padding(chunk)]
            if sinks:  # the most leading pads of any row: the sinks of every row lie within lead + sinks
                flags.append((~token_mask).long().cumprod(-1).sum(-1).max())
            chunk_padded, interior, *rest = torch.stack([f.long() for f in flags]).tolist()
            lead = rest[0] if rest else 0
        span = sinks + lead if sinks else 0
        if sinks and cache is not None:  # a window layer learns its sinks' span before its first update
            for index in self._window_layers():
                layer = cache.layers[index] if index < len(getattr(cache, "layers", ())) else None
                if isinstance(layer, EchoWindowLayer) and layer.sinks:
                    if not layer.is_initialized:
                        layer.sink_span = span
                    span = layer.sink_span  # what the cache holds decides where the window's keys start
        self._context = ForwardContext(
            token_mask=token_mask,
            chunk_padded=bool(chunk_padded),
            trailing_padding=not interior,
            past_length=cache.get_seq_length() if cache is not None else 0,
            distilling=self._distill_terms is not None or self._observer is not None,
            sink_span=span,
        )

    def _keep(self, length: int) -> torch.Tensor | None:
        """Real-token mask [B, length] of this forward's own last ``length`` tokens, or None when they
        include no padding (known on the host since `_capture_context`)."""
        mask = self._context.token_mask
        if mask is None or not self._context.chunk_padded:
            return None
        if mask.shape[1] < length:
            raise ValueError(f"attention_mask covers {mask.shape[1]} positions, the Echo graft needs {length}: "
                             "pass the mask of the whole sequence (past tokens included)")
        return mask[:, -length:]

    # -- the Echo branch -------------------------------------------------------------------------
    def _echo_output(self, index: int, x: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_o y [B, T, d] in x's dtype, the readout y [B, H, T, P] in float32) for layer ``index`` and its
        input x [B, T, d]. The branch computes in float32 with autocast off (`graftlm.dtype_policy`), whatever
        the base's dtype."""
        branch = self.branches[str(index)]
        keep = self._keep(x.shape[1])
        state = state_of(cache, STATE_KEY)
        slot = state.layers.get(index) if state is not None else None
        if slot is None and self._context.past_length > 0:
            raise RuntimeError(
                f"the Echo graft continues a sequence only from a GraftCache holding its state (an EchoCache is one), "
                f"not this {type(cache).__name__}: use GraftModel.generate, or pass graft_model.make_cache() as the "
                f"cache")
        if slot is not None and slot.state is not None and keep is not None:
            raise ValueError("Echo: padded tokens after the prefill are not supported")
        with full_precision(x.device):
            z, q, v = branch.project(x.to(branch.w_q.weight.dtype))
            if keep is not None:  # padding adds nothing to the statistics
                z, v = z * keep[:, None, :, None], v * keep[:, None, :, None]
            if slot is None:
                y = echo_sequence(z, q, v, branch.gamma, branch.eta, keep, self.settings,
                                  self._context.trailing_padding)
            elif slot.state is None:
                y, state, seen, phases = echo_prefill(z, q, v, branch.gamma, branch.eta, keep, self.settings)
                slot.update(state, seen, phases)
            else:
                y, state, seen, phases = echo_continue(slot.state, slot.seen, z, q, v, branch.gamma, branch.eta,
                                                       slot.phases)
                slot.update(state, seen, phases)
            return to_base(branch.output(y), x), y

    def _make_attention_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: tuple):
            if not self.active:
                return output
            attn_out, weights = output
            ramp = self.replace_ramp if self.replaces else 1.0
            distilling = self.replaces and self._context.distilling
            if ramp == 0.0 and not distilling:
                return output
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            echo_out, readout = (self._echo_output(index, x, cache_from_kwargs(kwargs)) if self.config.echo_branch
                                 else (None, None))
            if distilling:
                self._record_distillation(index, module, echo_out, readout)
            if ramp == 0.0 or echo_out is None:
                return output
            return attn_out + (echo_out if ramp == 1.0 else ramp * echo_out), weights

        return hook

    def _record_distillation(self, index: int, attention: nn.Module, echo_out: torch.Tensor | None,
                             readout: torch.Tensor | None) -> None:
        """The layer's distillation terms: the output MSE, and with ``head_distill_weight`` the head-space MSE
        between the readout y [B, H, T, P] and full - window [B, T, H, hd] (transposed to y's layout)."""
        full, window = self._pending.pop(index)
        flat = lambda t: t.reshape(*t.shape[:2], -1)
        teacher = attention.o_proj(flat(full)).detach()
        student = attention.o_proj(flat(window))
        if self._observer is not None:
            self._observer(index, teacher, student.detach(), None if echo_out is None else echo_out.detach())
        if echo_out is not None:
            student = student + echo_out
        keep = self._keep(student.shape[1])
        term = _token_mse(student.float(), teacher.float(), keep)
        head_term = None
        if self.config.head_distill_weight > 0 and readout is not None:
            missing = (full - window).detach().transpose(1, 2).float()  # [B, H, T, hd]
            head_keep = None if keep is None else keep[:, None, :].expand(-1, readout.shape[1], -1)
            head_term = _token_mse(readout, missing, head_keep)
        # a gradient-checkpointing recompute redoes the same ops (torch checks) but the loss was already taken
        if self._distill_terms is not None:
            self._distill_terms.append((term, head_term))

    @contextmanager
    def observe_layers(self, observer: LayerObserver) -> Iterator[None]:
        """Replace mode: while the context is open, every replaced layer's forward calls ``observer(index,
        teacher, window, echo)`` with what the distillation compares, each [B, T, d] and detached: the frozen
        full attention's output ``o_proj(full_attn)``, the window attention's ``o_proj(window_attn)``, and
        ``echo(x)`` (None without an Echo branch). The full attention is computed beside the window, as in
        distillation; the layer's output is unchanged. For diagnostics (``benchmarks/echo_diagnose.py``)."""
        if not self.replaces:
            raise ValueError("observe_layers: needs mode='replace' (a parallel graft has no window to compare)")
        if self._observer is not None:
            raise RuntimeError("observe_layers: an observer is already installed")
        self._observer = observer
        try:
            yield
        finally:
            self._observer = None
            self._pending.clear()

    # -- replace mode: the attention function ----------------------------------------------------
    def _base_attention(self, module: nn.Module):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._previous_attention in ALL_ATTENTION_FUNCTIONS:
            return ALL_ATTENTION_FUNCTIONS[self._previous_attention]
        return sys.modules[type(module).__module__].eager_attention_forward

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        """The model's attention function while a replace-mode graft is installed.

        query [B, Hq, q, hd], key/value [B, Hkv, k, hd] (after RoPE and the cache update; the queries are
        the last q of the k positions). Layers not replaced get the previous implementation unchanged.
        Returns (out [B, q, Hq, hd], weights or None) like every transformers attention function.
        """
        base = self._base_attention(module)
        index = self._replaced.get(module)
        if index is None or not self.active:
            return base(module, query, key, value, attention_mask, **kwargs)
        ramp = self.replace_ramp
        distilling = self._context.distilling
        if ramp == 0.0 and not distilling:
            return base(module, query, key, value, attention_mask, **kwargs)
        full = base(module, query, key, value, attention_mask, **kwargs)[0] if ramp < 1.0 or distilling else None
        window = self._window_attention(module, query, key, value, kwargs, self.sinks[index])
        if distilling:
            self._pending[index] = (full, window)
        if ramp == 0.0:
            return full, None
        if ramp == 1.0:
            return window, None
        return (1.0 - ramp) * full + ramp * window, None

    def _window_attention(self, module, query, key, value, kwargs, sinks: int) -> torch.Tensor:
        """Softmax attention of each query over the keys at distance [0, window) and the row's first
        ``sinks`` real tokens, padding excluded.

        The keys are the whole sequence, or (an `EchoWindowLayer` that dropped old tokens) the sinks' span
        followed by the most recent tokens, contiguous up to the newest: each key's position follows from
        the shapes and the host's ``past_length``. Queries go in blocks of ``max(window, query_block)``, each
        against only the sinks and the keys its window can reach, so a long prefill costs O(T (window +
        sinks)) memory instead of a [T, T] mask.
        """
        q_len, k_len = query.shape[2], key.shape[2]
        total = self._context.past_length + q_len  # positions in the sequence so far, this forward's included
        window = min(self.window, kwargs.get("sliding_window") or self.window)
        span = min(self._context.sink_span, k_len) if sinks else 0
        dropped = k_len < total
        recent = span if dropped and sinks else 0  # keys [recent, k_len) are contiguous up to position total - 1
        shift = total - k_len  # position of key index i >= recent: i + shift (keys before recent: their index)
        mask = self._context.token_mask
        if mask is not None and mask.shape[1] < total:
            raise ValueError(f"attention_mask covers {mask.shape[1]} positions, the Echo graft needs {total}: "
                             "pass the mask of the whole sequence (past tokens included)")
        real = None if mask is None else mask[:, -total:]
        sink_rows = real & (real.long().cumsum(-1) <= sinks) if sinks and real is not None else None
        block = max(window, self.query_block)
        outputs = []
        for start in range(0, q_len, block):
            stop = min(start + block, q_len)
            q_first = total - q_len + start  # position of the block's first query
            k_first = max(recent, q_first - window + 1 - shift)  # index of the first key its window reaches
            k_stop = total - q_len + stop - shift
            n_sink = min(span, k_first)  # sink keys before the window's keys
            k_pos = torch.arange(k_first, k_stop, device=query.device) + shift
            if n_sink:
                s_pos = torch.arange(n_sink, device=query.device)  # below recent (or contiguous): index = position
                k_pos = torch.cat([s_pos, k_pos])
                keys = torch.cat([key[:, :, :n_sink], key[:, :, k_first:k_stop]], dim=2)
                values = torch.cat([value[:, :, :n_sink], value[:, :, k_first:k_stop]], dim=2)
            else:
                keys, values = key[:, :, k_first:k_stop], value[:, :, k_first:k_stop]
            q_pos = torch.arange(q_first, total - q_len + stop, device=query.device)
            distance = q_pos[:, None] - k_pos[None, :]
            near = (distance >= 0) & (distance < window)  # [q, k]
            if sinks:
                sink = (k_pos < sinks)[None] if sink_rows is None else sink_rows[:, k_pos]  # [1 or B, k]
                allowed = near[None] | ((distance >= 0)[None] & sink[:, None, :])  # [1 or B, q, k]
            else:
                allowed = near[None]
            if real is not None:  # a padded query still sees itself, so its (unused) row stays finite
                allowed = (allowed & real[:, None, k_pos]) | (distance == 0)[None]
            out, _ = sdpa_attention_forward(
                module, query[:, :, start:stop], keys, values,
                allowed[:, None], dropout=kwargs.get("dropout", 0.0), scaling=kwargs.get("scaling"),
                is_causal=False)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    # -- generation and training -----------------------------------------------------------------
    supports_crop = False  # the statistics are sums (EchoCacheState.crop_refusal)

    def _window_layers(self) -> dict[int, int]:
        """Layer -> window of the replaced layers whose cache keeps only the window (ramp 1)."""
        return {i: self.window for i in self.layer_indices} if self.replaces and self.replace_ramp == 1.0 else {}

    def make_cache_state(self) -> EchoCacheState:
        return EchoCacheState(self.layer_indices if self.config.echo_branch else [])

    def cache_layers(self) -> dict[int, EchoWindowLayer]:
        return {index: EchoWindowLayer(sliding_window=window, sinks=self.sinks[index])
                for index, window in self._window_layers().items()}

    def cache_layers_replaced(self) -> set[int]:
        return set(self.layer_indices) if self.replaces else set()

    def make_cache(self) -> EchoCache:
        """An empty `EchoCache` for this graft alone: window-only KV layers for replaced layers at ramp 1."""
        echo_layers = self.layer_indices if self.config.echo_branch else []
        return EchoCache(self.base_model.config, echo_layers=echo_layers, window_layers=self.cache_layers())

    def prepare_generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check that the cache holds this graft's state (`GraftModel.generate` supplies one; called on its own,
        supply ``make_cache()`` when there is none, unless ``use_cache=False``: then every step is a
        whole-sequence forward, which needs no state)."""
        cache = cache_from_kwargs(kwargs)
        if kwargs.get("use_cache") is False and cache is None:
            return kwargs
        if cache is None:
            return {**with_cache(kwargs, self.make_cache()), "use_cache": True}
        if state_of(cache, STATE_KEY) is None:
            raise TypeError("an Echo graft generates with a GraftCache holding its state (graft_model.make_cache(), "
                            f"or an EchoCache: graft.make_cache()), not {type(cache).__name__}")
        return kwargs

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Replace mode with ``ramp_fraction > 0``: ``replace_ramp = config.replace_ramp * min(1, step /
        (ramp_fraction * total_steps))``, so the last step (and a saved adapter) has the configured value."""
        if not self.replaces or self.config.ramp_fraction == 0.0:
            return
        ramp_steps = max(1.0, self.config.ramp_fraction * total_steps)
        self.replace_ramp = self.config.replace_ramp * min(1.0, step / ramp_steps)

    @property
    def supplies_training_loss(self) -> bool:
        return self.config.distill_weight > 0.0 or self.config.head_distill_weight > 0.0

    def training_loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """LM loss + ``distill_weight`` x the layers' mean output MSE (+ ``head_distill_weight`` x their mean
        head-space MSE); None (plain LM loss) when both weights are 0. Returns {"loss", "lm_loss",
        "distill_loss"} and, with the head term, "head_distill_loss"."""
        if not self.supplies_training_loss:
            return None
        lm_loss, distill, head = self._forward_terms(model, batch)
        terms = {"loss": lm_loss + self.config.distill_weight * distill, "lm_loss": lm_loss.detach(),
                 "distill_loss": distill.detach()}
        if head is not None:
            terms["loss"] = terms["loss"] + self.config.head_distill_weight * head
            terms["head_distill_loss"] = head.detach()
        return terms

    def loss_terms(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM loss, the replaced layers' mean distillation MSE) of one forward, both with their graphs, so
        that each one's gradient can be taken apart (``benchmarks/echo_diagnose.py``). Replace mode only."""
        lm_loss, distill, _ = self._forward_terms(model, batch)
        return lm_loss, distill

    def _forward_terms(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(LM loss, mean output MSE, mean head-space MSE or None without ``head_distill_weight``) of one forward."""
        if not self.replaces:
            raise ValueError("loss_terms: the distillation needs mode='replace'")
        if "labels" not in batch:
            batch = {**batch, "labels": batch["input_ids"]}
        self._distill_terms = []
        try:
            lm_loss = model(**batch).loss
            terms = self._distill_terms
        finally:
            self._distill_terms = None
            self._pending.clear()
        heads = [head for _, head in terms if head is not None]
        return (lm_loss, torch.stack([output for output, _ in terms]).mean(),
                torch.stack(heads).mean() if heads else None)


def _token_mse(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the real tokens: student, teacher [..., T, D]; keep [..., T] bool (None = all
    real), weighted instead of indexed by the mask (indexing would be a host sync)."""
    if keep is None:
        return F.mse_loss(student, teacher)
    weight = keep[..., None].float()
    return ((student - teacher).pow(2) * weight).sum() / (weight.sum() * student.shape[-1]).clamp_min(1.0)


register_graft(EchoConfig, EchoGraft)
