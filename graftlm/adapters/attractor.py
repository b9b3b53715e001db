"""Attractor refinement: a weight-tied fixed-point head before the final norm (METHODS.md section 2;
"Solve the Loop: Attractor Models for Language and Reasoning", arXiv 2605.12466).

``c`` [B, T, d] is the backbone's last hidden state: the INPUT of ``patch.final_norm(model)``. A forward
pre-hook on the final norm replaces it by the fixed point ``y*`` [B, T, d] of the head's map::

    g(y; c) = c + sum_i (gamma_attn_i * Attn_i(norm(h_i)) + gamma_mlp_i * MLP_i(norm(h_i')))
    h_0 = y + c,   h_i' = h_i + gamma_attn_i * Attn_i(...),   h_{i+1} = h_i' + gamma_mlp_i * MLP_i(...)

over ``n_fp_blocks`` blocks i (the same weights at every solver iteration: weight-tied); for one block
this is METHODS.md's ``c + gamma_attn * Attn(y + c) + gamma_mlp * MLP(...)``, each block residual. The
gates are per channel, ``gamma = gamma_max * sigmoid(raw)`` [d]. ``norm`` is a learned RMSNorm (the
backbone's hidden states have large, model-dependent scales). Attention is causal, without rotary
positions (``c`` already carries position information), of width ``attn_heads * attn_head_dim``;
the MLP has a ``mlp_hidden`` bottleneck (SiLU). Logits = frozen ``lm_head(final_norm(y*))``.

Exact base reproduction at init: the output projections of every attention and MLP (``o_proj``,
``down_proj``) start at exactly zero (the gates start open at ``gamma_init``), so ``g(y; c) = c`` for
every y, ``y* = c`` and the logits are the base's bit for bit. Gradient descent opens the head: the
gradient of the zero projections is non-zero (like LoRA's B). Without grad, a head whose output
projections are all zero ("closed") skips the solve and returns ``c`` itself.

Solve (``graftlm.kernels.fixed_point``): ``y* = g(y*; c)`` from ``y0 = c``; under grad (training, or
LoRA on the backbone) with ``fixed_point_solve`` (implicit-function-theorem gradients, constant memory in
the number of iterations, adjoint mode ``backward``), otherwise ``solve`` under ``torch.no_grad``.
Convergence is judged per position (issue 14): a sequence has converged only when every one of its
(non-padding) positions has ``||g(y)_t - y_t|| / ||y_t|| < tol``; its residual is its worst position's.
``last_solve_info`` holds the last call's per-sequence iterations, residual, converged and fallback
flags and the first-guess residual (at y0 = c). The solver's fallback keeps the iterates finite, so
the logits are never NaN from the head. Contraction control is on by default (`AttractorConfig`: the
Jacobian regulariser ``||J^T v||^2`` at weight 1e-3 through ``training_loss``, the adjoint clip, the
gate bound). ``training_loss`` also returns the solve's figures (converged and fallback fractions, mean
and max iterations, first-guess residual), so the recipes loop logs them every step, and a solve that
keeps running to max_iter is a logged warning.

``iterate='unrolled'`` is the control without a fixed point: g applied exactly ``max_iter`` times from
c, differentiated through every pass (max_iter 1: the head applied once, a plain extra block).

Generation: the head keeps its own KV cache in the `GraftCache` the model is called with (``cache``,
``past_key_values`` before transformers 5.24; `AttractorCacheState`: per block the keys/values
[B, H, T_past, hd] of the earlier positions' converged ``h_i``; on another transformers cache, or one the
model made itself, as its attribute ``graftlm_attractor``, exact for greedy decoding only). For a new chunk, the
earlier positions are fixed at their fixed point; the chunk's queries attend to those cached
keys/values and to the chunk's own iterates.
Because attention is causal, the joint fixed point of a full forward restricted to a prefix is the
prefix's fixed point, so prefill + token-by-token decode equals one full forward (up to the solver
tolerance). Per-call iteration counts are appended to the cache (``cache_iterations``); in decode one
call is one token. Beam search reorders the head's KV with the beams; a crop slices it.

dtypes and host syncs (`graftlm.dtype_policy`): the head, its KV cache and the solve are float32 under
a bf16 base (a bf16 map can't get its residual below ~4e-3, the tolerance is 1.5e-4), with autocast off;
y* goes back to the base in its dtype. A decode step reads the device only for the solver's convergence
checks, one per ``check_every`` updates after ``min_iter`` (``kernels/fixed_point/solvers.py``); whether
the head is closed is read once per change of its output weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft import Graft
from graftlm.adapters.graft_cache import GraftState, missing_state_error, state_of
from graftlm.adapters.lora import DEFAULT_TARGET_MODULES
from graftlm.adapters.registry import register_graft
from graftlm.dtype_policy import full_precision, to_base
from graftlm.kernels.fixed_point import (
    FixedPointConfig,
    FixedPointInfo,
    fixed_point_solve,
    relative_residual,
    solve,
)
from graftlm.patches.cache_kwarg import cache_from_kwargs, cache_from_output

STATE_KEY = "attractor"  # the graft's key in GraftCache.graft_states (its graft type)
WARN_WINDOW = 10  # training steps per max_iter warning check (one host sync each)
logger = logging.getLogger(__name__)


@dataclass
class AttractorConfig(GraftConfig):
    """Attractor refinement: a fixed-point head between the last hidden state and the final norm
    (METHODS.md section 2).

    Contraction control is on by default (issue 14); the choices, measured on SmolLM2-135M with real
    text (``benchmarks/attractor_contraction.py``, RESULTS.md "Attractor (issue 14)"):

    * ``gamma_max = 1``: the gates bound the map's Lipschitz constant linearly (each block's update is
      gated per channel by at most gamma_max). A fresh head is exactly constant (rho = 0). A head
      opened to the input projections' scale (output projections drawn with std 0.02, every gate fully
      open at gamma_max) measured a Jacobian spectral norm rho of 0.009 (0.025 at std 0.05; rho is
      linear in gamma_max: 0.018 at gamma_max 2): the backbone's hidden states are large and the head's
      RMSNorms divide by them, so the map is strongly contractive at init with ~40x headroom at
      gamma_max 1. A smaller bound would only cap how far the trained head can move y.
    * ``jacobian_weight = 1e-3`` (METHODS.md; the paper's lambda): keeps rho small as training grows the
      output projections, at the cost of one double backward through one evaluation of g per step.
    * ``adjoint_clip = 2``: for a map with contraction rho the exact adjoint u = v + J^T u satisfies
      ||u|| <= ||v|| / (1 - rho); 2 is that bound at rho = 0.5. While the map stays contractive the
      clip never binds (at the measured rho ~0.01, ||u|| / ||v|| ~1.01); when it binds the map has lost
      contraction, its adjoint (one-step mode: u ~ v + J^T v) is not trustworthy, and the clip keeps
      one bad step from wrecking the head. It applies in every adjoint mode.
    """

    graft_type = "attractor"

    n_fp_blocks: int = field(default=1, metadata={"help": "Blocks (attention + MLP) in the head's map g.", "min": 1})
    attn_heads: int = field(default=4, metadata={"help": "Attention heads of each head block.", "min": 1})
    attn_head_dim: int = field(default=32, metadata={"help": "Width of each attention head.", "min": 1})
    mlp_hidden: int = field(default=256, metadata={"help": "MLP bottleneck width of each head block.", "min": 1})
    gamma_max: float = field(
        default=1.0,
        metadata={"help": "Upper bound of the gates gamma_max * sigmoid(raw); bounds the map's Lipschitz "
                          "constant linearly (see the class docstring).", "gt": 0.0},
    )
    gamma_init: float = field(
        default=0.1,
        metadata={
            "help": "Initial gate value (in (0, gamma_max)); the zero output projections "
            "keep the fresh head exact.",
            "gt": 0.0,
        },
    )
    init_std: float = field(
        default=0.02, metadata={"help": "Std of the head's input projections at init.", "gt": 0.0}
    )
    norm_eps: float = field(default=1e-6, metadata={"help": "Epsilon of the head's RMSNorms.", "gt": 0.0})
    # -- solver (mirrors graftlm.kernels.fixed_point.FixedPointConfig) --
    solver: Literal["anderson", "picard"] = field(default="anderson", metadata={"help": "Forward solver."})
    m: int = field(default=5, metadata={"help": "Anderson memory.", "min": 1})
    beta: float = field(default=1.0, metadata={"help": "Anderson mixing.", "gt": 0.0})
    lam: float = field(default=1e-4, metadata={"help": "Anderson least-squares ridge (relative).", "min": 0.0})
    tol: float = field(
        default=1.5e-4,
        metadata={"help": "Relative-residual tolerance of the forward solve (0: run max_iter).", "min": 0.0},
    )
    min_iter: int = field(default=6, metadata={"help": "Fewest solver updates (<= max_iter).", "min": 0})
    max_iter: int = field(default=32, metadata={"help": "Most solver updates.", "min": 1})
    backward: Literal["one_step", "picard", "anderson"] = field(
        default="anderson", metadata={"help": "Adjoint mode of the implicit gradient."}
    )
    adjoint_max_iter: int = field(
        default=32, metadata={"help": "Most updates of the adjoint solve.", "min": 0}
    )
    adjoint_tol: float = field(default=1e-5, metadata={"help": "Tolerance of the adjoint solve.", "min": 0.0})
    adjoint_clip: float | None = field(
        default=2.0,
        metadata={"help": "Clip each sequence's adjoint to ||u|| <= clip * ||v|| (None: off); 2 is the exact "
                          "adjoint's bound 1 / (1 - rho) at contraction rho = 0.5.", "gt": 0.0},
    )
    jacobian_weight: float = field(
        default=1e-3,
        metadata={"help": "Weight of the Jacobian regulariser ||J^T v||^2 (METHODS.md section 2: 1e-3; "
                          "0: off).", "min": 0.0},
    )
    jacobian_samples: int = field(
        default=1, metadata={"help": "Hutchinson samples when the regulariser is on.", "min": 1}
    )
    # -- optional LoRA on the backbone (equilibrium internalisation) --
    lora_r: int = field(
        default=0, metadata={"help": "Rank of an optional peft LoRA on the backbone (0: off).", "min": 0}
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r).", "gt": 0.0}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Modules LoRA adapts (a single name is a one-item list).", "non_empty": True},
    )
    check_every: int = field(
        default=4,
        metadata={"help": "Solver: read 'all sequences stopped?' (a host sync) every check_every updates "
                          "after min_iter; the results don't depend on it.", "min": 1},
    )
    iterate: Literal["fixed_point", "unrolled"] = field(
        default="fixed_point",
        metadata={"help": "'fixed_point': solve y* = g(y*; c) (implicit gradients); 'unrolled': apply g exactly "
                          "max_iter times from y0 = c and backpropagate through them, no solve, no tolerance "
                          "(max_iter 1: the head applied once, the control without a fixed point; no Jacobian "
                          "regulariser, it belongs to the fixed point)."},
    )
    max_iter_warning: float = field(
        default=0.5,
        metadata={"help": "Training: warn when, over the last 10 steps, more than this share of the steps had "
                          "a sequence that ran to max_iter unconverged (1: never).", "min": 0.0},
    )

    def validate(self) -> None:
        if not self.gamma_init < self.gamma_max:
            raise self.error("gamma_init", f"must lie in (0, gamma_max={self.gamma_max}), got {self.gamma_init}")
        if self.min_iter > self.max_iter:
            raise self.error("min_iter", f"must be <= max_iter={self.max_iter}, got {self.min_iter}")
        try:
            self.solver_config(0)  # the solver's own checks
        except ValueError as err:
            raise self.error("solver", str(err)) from None

    def solver_config(self, jacobian_samples: int = 0) -> FixedPointConfig:
        """The solver settings: this config's fields of the same names as `FixedPointConfig`'s."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(FixedPointConfig) if hasattr(self, f.name)}
        return FixedPointConfig(**{**shared, "jacobian_samples": jacobian_samples, "per_position": True})


# -- the head ------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class AttractorBlock(nn.Module):
    """One block of g: causal attention and MLP with per-channel gates (METHODS.md section 2)."""

    def __init__(self, d: int, config: AttractorConfig):
        super().__init__()
        self.heads, self.head_dim = config.attn_heads, config.attn_head_dim
        width = self.heads * self.head_dim
        self.attn_norm = _RMSNorm(d, config.norm_eps)
        self.qkv_proj = nn.Linear(d, 3 * width, bias=False)
        self.o_proj = nn.Linear(width, d, bias=False)
        self.mlp_norm = _RMSNorm(d, config.norm_eps)
        self.up_proj = nn.Linear(d, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, d, bias=False)
        raw = math.log(config.gamma_init / (config.gamma_max - config.gamma_init))
        self.gate_attn_raw = nn.Parameter(torch.full((d,), raw))
        self.gate_mlp_raw = nn.Parameter(torch.full((d,), raw))
        self.gamma_max = config.gamma_max
        nn.init.normal_(self.qkv_proj.weight, std=config.init_std)
        nn.init.normal_(self.up_proj.weight, std=config.init_std)
        nn.init.zeros_(self.o_proj.weight)  # exact base reproduction at init
        nn.init.zeros_(self.down_proj.weight)

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma_attn, gamma_mlp [d] = gamma_max * sigmoid(raw)."""
        return self.gamma_max * torch.sigmoid(self.gate_attn_raw), self.gamma_max * torch.sigmoid(
            self.gate_mlp_raw
        )

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, d] -> q, k, v [B, H, T, hd]."""
        b, t, _ = h.shape
        qkv = self.qkv_proj(self.attn_norm(h)).view(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, h: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
        """h [B, T, d], mask [B, 1, T, T_past + T] (True = attend), past (K, V) [B, H, T_past, hd].
        Returns (update [B, T, d] this block adds, h after the block, (k, v) of this chunk)."""
        gamma_attn, gamma_mlp = self.gates()
        q, k, v = self.keys_values(h)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        delta_attn = gamma_attn * self.o_proj(attn)
        h = h + delta_attn
        delta_mlp = gamma_mlp * self.down_proj(F.silu(self.up_proj(self.mlp_norm(h))))
        return delta_attn + delta_mlp, h + delta_mlp, (k, v)

    def output_scale(self) -> torch.Tensor:
        """Largest |weight| of the two output projections, a 0-dim device tensor (0: the block adds nothing)."""
        return torch.maximum(self.o_proj.weight.detach().abs().amax(), self.down_proj.weight.detach().abs().amax())


class AttractorHead(nn.Module):
    """The map g(y; c) of METHODS.md section 2 over ``n_fp_blocks`` blocks; y, c [B, T, d]."""

    def __init__(self, d: int, config: AttractorConfig):
        super().__init__()
        self.blocks = nn.ModuleList(AttractorBlock(d, config) for _ in range(config.n_fp_blocks))

    def forward(
        self,
        y: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor,
        past: list | None = None,
        record: list | None = None,
    ) -> torch.Tensor:
        """g(y; c) [B, T, d]. ``past``: per block (K, V) of earlier positions; ``record``: a list that
        receives each block's (k, v) of this chunk."""
        h = y + c
        update = torch.zeros_like(c)
        for i, block in enumerate(self.blocks):
            delta, h, kv = block(h, mask, None if past is None else past[i])
            update = update + delta
            if record is not None:
                record.append(kv)
        return c + update

    def closed(self) -> bool:
        """True when every output projection is exactly zero: then g(y; c) = c for all y. One host read,
        taken once per forward: a cached answer would go stale under writes that bypass the version
        counters (``p.data.normal_()``) and give the base's logits for an open head."""
        return bool(torch.stack([block.output_scale() for block in self.blocks]).amax() == 0)


def attention_mask(
    batch: int, length: int, past: int, key_valid: torch.Tensor | None, device
) -> torch.Tensor:
    """[B, 1, T, T_past + T] bool: causal over the chunk placed after T_past cached positions, keys at
    padding (``key_valid`` [B, T_past + T] False) excluded, each position always sees itself."""
    query = torch.arange(length, device=device)[:, None] + past
    key = torch.arange(past + length, device=device)[None, :]
    mask = (key <= query)[None].expand(batch, -1, -1)
    if key_valid is not None:
        mask = mask & (key_valid[:, None, :].bool() | (key == query)[None])
    return mask[:, None]


class _Run:
    """What the top-level forward tells the final-norm hook: padding mask, the cache's attractor state, its
    past length; ``previous``: the run of an enclosing forward (a forward nested in another graft's hook)."""

    def __init__(self, attention_mask: torch.Tensor | None, cache_state: AttractorCacheState | None,
                 past_length: int, use_cache: bool = False, previous: _Run | None = None):
        self.attention_mask = attention_mask
        self.use_cache = use_cache  # a cache created inside the forward is picked up from the output
        self.cache_state = cache_state
        self.past_length = past_length
        self.previous = previous
        self.chunk: tuple | None = None  # (kv, iterations [B], tokens, mode) of this call, for the cache


class AttractorCacheState(GraftState):
    """The Attractor head's state in a `GraftCache` (or, as ``graftlm_attractor``, on another cache: `state_of`).

    ``kv``: per head block the keys/values (K, V) [B, H, T_past, hd] of the earlier positions' converged
    ``h_i`` (``iterate='unrolled'``: one such list per pass); ``length``: T_past; ``mode``: what ``kv`` holds
    (`AttractorGraft._cache_mode`); ``iterations`` / ``tokens``: per forward call its solver iterations [B]
    and its token count. Beam reorder, row selection and repeats index K, V and the iteration rows. A crop
    slices K, V (a causal head's fixed point over a prefix doesn't depend on later tokens) and drops the
    records of the calls past the new length.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.kv: list | None = None
        self.length = 0
        self.mode: str | None = None
        self.iterations: list[torch.Tensor] = []
        self.tokens: list[int] = []

    def _block_lists(self) -> list[list]:
        """The per-block (K, V) lists: one (fixed point) or one per unrolled pass."""
        if self.kv is None:
            return []
        return [self.kv] if self.mode == "fixed_point" else list(self.kv)

    def _map_kv(self, fn) -> None:
        mapped = [[(fn(k), fn(v)) for k, v in blocks] for blocks in self._block_lists()]
        if self.kv is not None:
            self.kv = mapped[0] if self.mode == "fixed_point" else mapped

    def append(self, kv: list, iterations: torch.Tensor, tokens: int, mode: str) -> None:
        """Add one forward call's chunk: its per-block (k, v) (unrolled: per pass), iterations [B], tokens."""
        def cat(past, new):
            return new if past is None else [(torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                                             for (pk, pv), (k, v) in zip(past, new)]

        if mode == "fixed_point":
            self.kv = cat(self.kv, kv)
        else:
            self.kv = [cat(None if self.kv is None else self.kv[p], chunk) for p, chunk in enumerate(kv)]
        self.mode = mode
        self.length += tokens
        self.iterations.append(iterations)
        self.tokens.append(tokens)

    def map_rows(self, fn) -> None:
        self._map_kv(fn)
        self.iterations = [fn(i) for i in self.iterations]

    def crop_to(self, length: int, removed: int) -> None:
        if length >= self.length:
            return
        if length == 0:
            self.reset()
            return
        self._map_kv(lambda t: t[:, :, :length])
        kept, total = 0, 0
        for kept, tokens in enumerate(self.tokens, start=1):  # the calls up to the new length (the last one cut)
            total += tokens
            if total >= length:
                break
        self.iterations, self.tokens = self.iterations[:kept], self.tokens[:kept]
        self.tokens[-1] -= total - length
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for blocks in self._block_lists() for k, v in blocks for t in (k, v))


class AttractorGraft(Graft):
    """The fixed-point head ``head`` (and an optional backbone LoRA), hooked on the final norm's input.

    ``last_solve_info`` (after each forward): per sequence [B] ``iterations``, ``residual`` (relative, of
    the returned iterate), ``converged``, ``fallback``; and ``tokens`` (T of the chunk). One attractor
    graft per model: a second would share the cache attribute.
    """

    def __init__(self, config: AttractorConfig, base_model: nn.Module, patch):
        super().__init__(config, base_model, patch)
        self.head = AttractorHead(base_model.config.hidden_size, config)
        self.last_solve_info: dict[str, torch.Tensor] | None = None
        self.last_fixed_point_info: FixedPointInfo | None = None  # of the last solve under grad
        self.last_jacobian_loss: torch.Tensor | None = None
        self._run: _Run | None = None
        self._hit_steps: torch.Tensor = torch.zeros(())  # training steps with a max_iter hit (device scalar)
        self._steps_seen = 0

    # -- install ---------------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.base_model
        if self.config.lora_r > 0:
            self.attach_lora(self.config.lora_r, self.config.lora_alpha, self.config.lora_target_modules)
        self.add_hook(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self.add_hook(model.register_forward_hook(self._after_model, with_kwargs=True))
        self.add_hook(
            self.patch.final_norm(model).register_forward_pre_hook(self._refine_hook, with_kwargs=True)
        )

    def _before_model(self, module, args, kwargs):
        if not self.active:
            return
        cache = cache_from_kwargs(kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        cache_state = state_of(cache, STATE_KEY, make=AttractorCacheState)
        if cache is not None and cache_state is None:
            raise missing_state_error("attractor", cache)
        self._run = _Run(mask, cache_state, past, bool(kwargs.get("use_cache")), previous=self._run)

    def _after_model(self, module, args, kwargs, output):
        run = self._run
        if run is None:
            return
        self._run = run.previous  # a forward nested in another graft's hook (SST's first pass) leaves it as it was
        if run.chunk is None:
            return
        state = run.cache_state
        if state is None:  # the model made a cache of its own: the state rides on it (`state_of`)
            state = state_of(cache_from_output(output), STATE_KEY, make=AttractorCacheState)
        if state is not None:
            state.append(*run.chunk)

    def _refine_hook(self, module, args, kwargs):
        if not self.active:
            return None
        if args:
            return (self.refine(args[0]),) + args[1:], kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: self.refine(kwargs[key])}

    # -- the solve ---------------------------------------------------------------------------------------
    def refine(self, c: torch.Tensor) -> torch.Tensor:
        """c [B, T, d] -> y* [B, T, d] (METHODS.md section 2), in c's dtype."""
        run = self._run or _Run(None, None, 0)
        batch, length, _ = c.shape
        state = run.cache_state if run.cache_state is not None and run.cache_state.kv is not None else None
        if state is not None and state.length != run.past_length:
            raise RuntimeError(
                f"attractor cache holds {state.length} positions, the backbone cache {run.past_length}"
            )
        if state is None and run.past_length > 0:
            raise RuntimeError(
                "the generation cache has positions but no attractor state (built without the graft?)"
            )
        mode = self._cache_mode()
        if state is not None and state.mode != mode:
            raise RuntimeError(f"the attractor cache was built in mode {state.mode}, this call solves in {mode}"
                               " (iterate / max_iter changed during generation)")
        past_kv = state.kv if state is not None else None
        need_grad = torch.is_grad_enabled() and (
            c.requires_grad or any(p.requires_grad for p in self.head.parameters())
        )
        c_head = c.to(self.head.blocks[0].qkv_proj.weight.dtype)  # float32 under a bf16 base (dtype_policy)
        key_valid = None
        if run.attention_mask is not None:
            key_valid = run.attention_mask[:, -(run.past_length + length) :].to(c.device)
        mask = attention_mask(batch, length, run.past_length, key_valid, c.device)
        valid = None if key_valid is None else key_valid[:, -length:].bool()  # positions judged by the solve
        keep_state = run.cache_state is not None or run.use_cache

        with full_precision(c.device):  # autocast would run the head in bf16, short of the tolerance
            if self.config.iterate == "unrolled":
                y_star, info, kv = self._unrolled(c_head, mask, past_kv, valid, keep_state, need_grad)
            else:
                y_star, info = self._solve(lambda y: self.head(y, c_head, mask, past_kv), c_head, need_grad, valid)
                kv = self._fixed_point_kv(y_star, c_head, mask, past_kv) if keep_state else None
            info["tokens"] = length
            self.last_solve_info = info
            if keep_state:
                run.chunk = (kv, info["iterations"].detach(), length, mode)
        return to_base(y_star, c)

    def _cache_mode(self) -> str:
        """What the head's KV cache holds: the fixed point's keys/values, or those of each unrolled pass."""
        config = self.config
        return "fixed_point" if config.iterate == "fixed_point" else f"unrolled x{config.max_iter}"

    def _solve(self, g, c: torch.Tensor, need_grad: bool, valid: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, Any]]:
        """y* = g(y*) from y0 = c [B, T, d]: implicit gradients under grad, a no-grad solve otherwise.
        Convergence is judged per position (``valid`` [B, T]: the positions that count, None: all)."""
        closed = self.head.closed()
        if not need_grad and closed:  # g(y; c) = c: y* = c, nothing to solve
            return c, _closed_report(c)
        config = self.config
        if need_grad:
            solver_config = config.solver_config(config.jacobian_samples if config.jacobian_weight > 0 else 0)
            if closed:  # stop at y0 = c exactly; the gradient still reaches the zero projections
                solver_config.min_iter = 0
            y_star, fp_info = fixed_point_solve(g, c, solver_config, valid)
            self.last_fixed_point_info = fp_info  # its ``adjoint`` is filled in by the backward
            self.last_jacobian_loss = fp_info.jacobian_loss
            return y_star, _report(fp_info.forward)
        with torch.no_grad():
            y_star, solve_info = solve(
                g, c, config.solver, tol=config.tol, min_iter=config.min_iter, max_iter=config.max_iter,
                m=config.m, beta=config.beta, lam=config.lam, check_every=config.check_every,
                per_position=True, position_mask=valid,
            )  # fmt: skip
        return y_star, _report(solve_info)

    def _unrolled(self, c: torch.Tensor, mask, past_kv, valid, keep_state: bool, need_grad: bool):
        """``iterate='unrolled'``: y_n = g^n(c) [B, T, d] with n = max_iter, differentiable through every
        pass (no fixed point). Pass k attends to the earlier positions' keys/values of pass k, so the cache
        holds one set per pass (``past_kv[k]``) and prefill + decode equals one full forward exactly.
        Returns (y_n, report, per pass the chunk's (k, v) of every block or None). The report's residual is
        that of y_n (one extra no-grad evaluation of g; in decode the earlier positions enter it with their
        keys of pass n - 1), ``converged`` means it is below tol, and the first-guess residual is
        ||g(c) - c|| / ||c|| (per position, the worst)."""
        if not need_grad and self.head.closed():  # g(y; c) = c: every pass returns c exactly
            n = self.config.max_iter
            kv = [self._fixed_point_kv(c, c, mask, None if past_kv is None else past_kv[k]) for k in range(n)] \
                if keep_state else None
            return c, _closed_report(c), kv
        y, passes, first = c, [], None
        for k in range(self.config.max_iter):
            record: list | None = [] if keep_state else None
            y = self.head(y, c, mask, None if past_kv is None else past_kv[k], record=record)
            passes.append(None if record is None else [(key.detach(), value.detach()) for key, value in record])
            first = y.detach() if first is None else first
        length = c.shape[1]
        with torch.no_grad():
            last, c0 = y.detach(), c.detach()
            g_last = self.head(last, c0, mask, None if past_kv is None else past_kv[-1])
            residual = relative_residual(last.flatten(1), g_last.flatten(1), length, valid)
            first = g_last if first is None else first  # max_iter 0: y = c, and g(c) was just evaluated
            first_guess = relative_residual(c0.flatten(1), first.flatten(1), length, valid)
        batch = c.shape[0]
        report = {
            "iterations": torch.full((batch,), self.config.max_iter, dtype=torch.long, device=c.device),
            "residual": residual,
            "converged": residual < self.config.tol,
            "fallback": torch.zeros(batch, dtype=torch.bool, device=c.device),
            "first_guess_residual": first_guess,
        }
        return y, report, passes if keep_state else None

    @torch.no_grad()
    def _fixed_point_kv(self, y_star, c, mask, past_kv) -> list:
        """Per block the chunk's (k, v) [B, H, T, hd] at the converged y*."""
        record: list = []
        self.head(y_star.detach(), c.detach(), mask, past_kv, record=record)
        return record

    @contextmanager
    def iteration_budget(self, max_iter: int, min_iter: int = 0):
        """Temporarily solve with at most ``max_iter`` updates (METHODS.md section 2, internalisation
        measurements). ``max_iter=0`` returns y0 = c and ``last_solve_info["residual"]`` is then the
        first-guess residual ||g(c) - c|| / ||c||; with 1 the better of y0 and g(y0) is returned."""
        saved = (self.config.max_iter, self.config.min_iter)
        self.config.max_iter, self.config.min_iter = max_iter, min(min_iter, max_iter)
        try:
            yield self
        finally:
            self.config.max_iter, self.config.min_iter = saved

    # -- reporting --------------------------------------------------------------------------------------
    @staticmethod
    def cache_iterations(cache) -> list[torch.Tensor]:
        """Per forward call on this cache (prefill, then one per decoded token): iterations [B], on the
        model's device (kept there: copying each to the host would stall every decode step)."""
        state = state_of(cache, STATE_KEY)
        return [] if state is None else list(state.iterations)

    def make_cache_state(self) -> AttractorCacheState:
        return AttractorCacheState()

    # -- training ---------------------------------------------------------------------------------------
    def training_loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """LM loss + ``jacobian_weight`` x the Jacobian regulariser of the solve (METHODS.md section 2). The
        solve's convergence figures reach the training log through `training_statistics`, which the loop
        asks of every graft after the forward."""
        if "labels" not in batch:
            batch = {**batch, "labels": batch["input_ids"]}
        self.last_jacobian_loss = None
        lm_loss = model(**batch).loss
        terms = {"loss": lm_loss, "lm_loss": lm_loss.detach()}
        jacobian = self.last_jacobian_loss
        if jacobian is not None and self.config.jacobian_weight > 0:
            terms["loss"] = lm_loss + self.config.jacobian_weight * jacobian
            terms["jacobian_loss"] = jacobian.detach()
        return terms

    def training_statistics(self) -> dict[str, torch.Tensor]:
        """The last solve's figures, device scalars (the loop reads them once per log line): the fraction of
        sequences that converged (every position below tol), that fell back to an earlier iterate, that ran
        to max_iter unconverged; mean and max iterations; mean first-guess residual ||g(c) - c|| / ||c||
        and the largest final residual (both per position, the worst). Counts repeated max_iter hits for
        the warning of `on_train_step`."""
        info = self.last_solve_info
        if info is None:  # no solve yet
            return {}
        converged = info["converged"].float()
        hit = (~info["converged"] & (info["iterations"] >= self.config.max_iter)).float()
        if self.config.iterate == "fixed_point":
            self._hit_steps = self._hit_steps + (hit.amax() > 0).float()
            self._steps_seen += 1
        return {
            "solve_converged": converged.mean(),
            "solve_fallback": info["fallback"].float().mean(),
            "solve_hit_max_iter": hit.mean(),
            "solve_iterations_mean": info["iterations"].float().mean(),
            "solve_iterations_max": info["iterations"].float().amax(),
            "solve_first_guess_residual": info["first_guess_residual"].float().mean(),
            "solve_residual_max": info["residual"].float().amax(),
        }

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Every ``WARN_WINDOW`` steps read (one host sync) how many of the last steps had a solve that ran to
        max_iter without converging; warn (logger ``graftlm.adapters.attractor``) above ``max_iter_warning``."""
        if self._steps_seen < WARN_WINDOW:
            return
        share = float(self._hit_steps) / self._steps_seen
        if share > self.config.max_iter_warning:
            logger.warning(
                "attractor: in %d of the last %d training steps a solve ran to max_iter=%d without converging "
                "(tol %g); the map may have lost contraction (raise jacobian_weight, lower lr or gamma_max)",
                round(share * self._steps_seen), self._steps_seen, self.config.max_iter, self.config.tol)
        self._hit_steps, self._steps_seen = torch.zeros(()), 0


def _closed_report(c: torch.Tensor) -> dict[str, torch.Tensor]:
    """The report of a closed head (g(y; c) = c): y* = y0 = c, converged with 0 updates. c [B, T, d]."""
    batch, device = c.shape[0], c.device
    return {
        "iterations": torch.zeros(batch, dtype=torch.long, device=device),
        "residual": torch.zeros(batch, device=device),
        "converged": torch.ones(batch, dtype=torch.bool, device=device),
        "fallback": torch.zeros(batch, dtype=torch.bool, device=device),
        "first_guess_residual": torch.zeros(batch, device=device),
    }


def _report(info) -> dict[str, torch.Tensor]:
    return {
        "iterations": info.iterations,
        "residual": info.residual,
        "converged": info.converged,
        "fallback": info.fallback,
        "first_guess_residual": info.trace[0],
    }


register_graft(AttractorConfig, AttractorGraft)
