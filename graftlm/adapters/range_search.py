"""Range-search attention as a graft (METHODS.md section 4; arXiv 2605.06763): decode attention of the
frozen model's full-attention layers runs over part of its KV cache, chosen through an index.

Three modes (``mode``):

* ``"exact"`` (the paper's method): each query head h keeps

      R(q_h, tau_h) = { k : q_h . k >= tau_h }  u  sinks  u  recent window

  found through the product-ball tree index (no false negatives: every key above tau is kept), and runs an
  ordinary softmax over exactly those keys with exact scores.
* ``"block"`` (fast, approximate): keys live in contiguous blocks; per kv head, blocks are read in order of
  their estimated softmax mass until the estimated captured mass reaches ``mass_target`` for every query
  head of the group (`graftlm.kernels.range_search.block_attention`). Approximate: the estimate is not a
  bound, and the mass kept can fall below the target.
* ``"certified"``: blocks are added in order of their score upper bound until a proven upper bound on the
  softmax mass left out is below ``tolerance`` for every head, so each step's attention error is bounded
  by proof.

In every mode a head the index cannot prune (more than ``dense_fallback`` of its keys would be read) is
computed densely instead, and (block and certified modes) a layer whose plan did not pay decodes densely
without planning for ``recheck_every`` steps, doubling up to ``recheck_max`` while its plans keep failing
(`graftlm.kernels.range_search.schedule`), so the graft costs little more than dense attention where it
cannot prune. Prefill (query length > 1) is dense. Gemma 3's sliding-window layers are always
left dense. No trainable parameters: the saved adapter holds only its config.

How it is wired (transformers 5.x):

* An attention function registered under a name of its own with ``AttentionInterface`` together with
  transformers' SDPA mask function (``AttentionMaskInterface``; without a mask function the mask is
  silently dropped), switched on with ``set_attention_implementation`` at install and restored at
  remove. Everything that is not a grafted decode step (prefill, sliding layers, short caches, a
  disabled graft) is delegated unchanged to ``transformers.integrations.sdpa_attention.sdpa_attention_forward``.
  The base's own implementation before attaching is not reused: on a base that ran ``eager`` the
  logits therefore match to float tolerance, on ``sdpa`` (the default) bit for bit.
* The index lives in the generation `GraftCache` (`RangeSearchCacheState`, ``range_search_cache.py``).
  The attention function gets no cache argument, so a forward pre-hook (with kwargs) on each grafted
  attention module hands the module's cache (``cache``; ``past_key_values`` before transformers 5.24) to
  the graft for the duration of that module's forward. Layers it does not graft run the attention function
  of a graft attached before it (Echo's window attention), else SDPA.
* ``generate`` through `GraftModel` uses its one `GraftCache` (`GraftModel.make_cache`). A caller's cache
  that holds no range-search state (a plain ``DynamicCache``) is used as given and decode stays dense (with
  a one-time warning): an index kept beside a foreign cache could silently go stale under beam reordering
  or cropping.

Thresholds of the exact mode, per query head (``threshold``):

* ``"budget"``: tau is the exact ceil(budget * n)-th largest score, from all n scores. Exact, but
  computing every score costs as much as dense attention's first half, so this mode saves nothing; it
  is the reference for what a budget means.
* ``"reservoir"``: tau is the (1 - budget) quantile of the scores of a uniform reservoir sample of the
  layer's keys (``reservoir_size`` per kv head). Cost independent of n; the kept fraction is an estimate
  (it can be above or below the budget). This is the realistic fast mode. With left padding the sample
  may include padded positions (their keys are those of the pad token), which blurs that row's estimate.

Sinks are the first ``n_sink`` real tokens of each row (left padding shifts them), the window is the
last ``window`` positions. Decode steps with fewer than ``min_keys`` keys (default `MIN_KEYS`) run the
model's own attention and build no index: below that length planning costs more than pruning saves.

Dense fallback of the exact mode: the tree's top level alone bounds how many keys a head can get as
candidates (`RangeSearchIndex.candidate_fraction`); above ``dense_fallback`` the head's range is found by
a dense scan (all scores by matmul, then the same filter), which gives the same set except that a key
within float rounding of tau may fall on the other side (the scan's matmul sums in another order than the
index's exact score).

Host syncs per grafted layer and decode step (counted by `graftlm.host_syncs.HostSyncCounter`): block mode
1 (the plan), certified mode 1-2, exact mode 1 when every head falls back to dense, more (one per tree
level and filter) when the index prunes. A step that moves keys into blocks (every ``block_size`` keys)
adds one more.

Limits: anything that rewrites the cache's past (beam search reorders it every step, contrastive
search selects rows, ``crop``) drops the indexes, and the next step rebuilds them from the cache: correct,
but beam search then pays an index build per step. The Triton backend is forward only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft import Graft
from graftlm.adapters.graft_cache import state_of
from graftlm.adapters.range_search_cache import (
    STATE_KEY,
    RangeSearchCache,
    RangeSearchCacheState,
    RangeSearchLayerState,
)
from graftlm.adapters.registry import register_graft
from graftlm.kernels.range_search import (
    RangeSearchIndex,
    attended_keys,
    block_sparse_decode,
    budget_threshold,
    dense_rows,
    exact_scores,
    gathered_attention,
    pack_rows,
    pair_scores,
    ragged_softmax_attention,
    softmax_mass_recall,
    triton_available,
)
from graftlm.kernels.range_search.block_attention import softmax
from graftlm.patches.cache_kwarg import cache_from_kwargs, with_cache

THRESHOLD_MODES = ("budget", "reservoir")
BACKENDS = ("auto", "torch", "triton")
MODES = ("exact", "block", "certified")
# dense_fallback when the config leaves it None: the fraction of a head's keys above which its indexed path
# costs more than dense attention, measured on a 2-core CPU by `benchmarks/range_search.py --calibrate`
# (issue 19): the block path breaks even at 0.2-0.3 of the keys for SmolLM2's heads (D = 64, 3 kv heads)
# and at 0.45-0.5 for Gemma 3's (D = 256, 1 kv head); the tree needs to prune about 90% to pay.
EXACT_DENSE_FALLBACK = 0.1
BLOCK_DENSE_FALLBACK = {64: 0.25, 256: 0.45}  # by head dim; other dims take the nearest
# min_keys by default: on a quiet 2-core CPU, one layer decoded 64 steps through the plan-or-dense schedule (the
# block and certified modes, and a layer that cannot prune) ran at 0.69x-1.11x of dense attention at 2k-4k keys,
# 0.90x-1.15x at 8k and 0.96x-1.08x at 16k-32k (both checkpoints' real keys, three runs; the "suggested min_keys"
# of `benchmarks/range_search.py`, RESULTS.md "Kernel level through the schedule"). SmolLM2's 8k context never
# reaches it: there the graft at its defaults is the base.
MIN_KEYS = 16384


def default_dense_fallback(mode: str, head_dim: int) -> float:
    """The measured dense_fallback of a mode for a head dimension (see BLOCK_DENSE_FALLBACK)."""
    if mode == "exact":
        return EXACT_DENSE_FALLBACK
    nearest = min(BLOCK_DENSE_FALLBACK, key=lambda d: abs(math.log(d / head_dim)))
    return BLOCK_DENSE_FALLBACK[nearest]


@dataclass
class RangeSearchConfig(GraftConfig):
    """Range-search decode attention through an index of the KV cache (METHODS.md section 4; issue 19): the
    paper's exact halfspace range, a fast block mode, or a certified block mode (``mode``)."""

    graft_type = "range_search"

    mode: str = field(
        default="block",
        metadata={"help": "'exact' (the paper's halfspace range through a product-ball tree, no false negatives), "
                          "'block' (fast, approximate: contiguous key blocks read in order of their estimated "
                          "softmax mass until mass_target), or 'certified' (blocks added until a proven bound "
                          "on the softmax mass left out is below tolerance).",
                  "choices": MODES},
    )
    mass_target: float = field(
        default=0.99,
        metadata={"help": "mode='block': estimated share of each query head's softmax mass to capture, in (0, 1]; "
                          "an estimate, so the mass really kept can be lower.", "gt": 0.0, "max": 1.0},
    )
    tolerance: float = field(
        default=0.01,
        metadata={"help": "mode='certified': proven upper bound on the softmax mass each query head leaves out, "
                          "in (0, 1).", "gt": 0.0, "lt": 1.0},
    )
    block_keys: int = field(
        default=16,
        metadata={"help": "Keys per block of the block index (modes 'block' and 'certified'); must divide "
                          "block_size.", "min": 1},
    )
    cluster_keys: int = field(
        default=1024,
        metadata={"help": "Prefill keys permuted together into blocks by one PCA tree (a multiple of block_size; "
                          "decode keys are permuted block_size at a time).", "min": 1},
    )
    outlier_norm: float | None = field(
        default=0.3,
        metadata={"help": "A key whose norm is off its chunk's median norm by more than this fraction of it is "
                          "always attended exactly (modes 'block' and 'certified'); None disables.", "gt": 0.0},
    )
    dense_fallback: float | None = field(
        default=None,
        metadata={"help": "Fraction of a head's keys (exact: candidates; block / certified: keys read) above "
                          "which the head is computed densely, in [0, 1]; None = the measured default: "
                          f"exact {EXACT_DENSE_FALLBACK}, block / certified by head dim {BLOCK_DENSE_FALLBACK}.",
                  "min": 0.0, "max": 1.0},
    )
    recheck_every: int = field(
        default=16,
        metadata={"help": "Modes 'block' / 'certified': after a planned step that did not pay (every head fell "
                          "back to dense, or the layer read more than dense_fallback of its keys), the layer "
                          "decodes densely, without planning, until this many steps have passed; each further "
                          "plan that does not pay doubles that interval (up to recheck_max).",
                  "min": 1},
    )
    recheck_max: int = field(
        default=256,
        metadata={"help": "Modes 'block' / 'certified': the longest dense interval between two plans of a layer "
                          "(>= recheck_every).", "min": 1},
    )
    budget: float = field(
        default=0.05,
        metadata={"help": "mode='exact': fraction of a row's keys each query head keeps above tau (sinks and "
                          "window come on top). >= 1 keeps every key (tau = -inf): decode then equals dense.",
                  "gt": 0.0},
    )
    threshold: str = field(
        default="reservoir",
        metadata={"help": "mode='exact': how tau is set: 'reservoir' (quantile of a uniform key sample; fast, "
                          "approximate budget) or 'budget' (exact top-budget from all scores; a dense score pass).",
                  "choices": THRESHOLD_MODES},
    )
    reservoir_size: int = field(
        default=1024, metadata={"help": "mode='exact': keys sampled per kv head for threshold='reservoir'.", "min": 1}
    )
    n_subspaces: int = field(
        default=4, metadata={"help": "mode='exact': subspaces S the head dimension is split into (at most head_dim).",
                             "min": 1}
    )
    leaf_size: int = field(default=4, metadata={"help": "mode='exact': keys per leaf ball of the tree index.", "min": 1})
    fanout: int = field(
        default=4, metadata={"help": "mode='exact': children per inner node of the tree index.", "min": 2}
    )
    block_size: int = field(
        default=256, metadata={"help": "Decode keys buffered before they are clustered into the index (every mode).",
                               "min": 1}
    )
    n_sink: int = field(default=4, metadata={"help": "First real tokens of each row always attended.", "min": 0})
    window: int = field(default=256, metadata={"help": "Most recent positions always attended.", "min": 0})
    min_keys: int = field(
        default=MIN_KEYS,
        metadata={"help": "Decode steps over fewer keys than this run the model's own attention (no plan, no "
                          "index: the base exactly); the default is where planning stops costing more than it "
                          "saves on a 2-core CPU (benchmarks/range_search.py, 'suggested min_keys').", "min": 0},
    )
    backend: str = field(
        default="auto",
        metadata={"help": "'torch' (vectorised CPU path), 'triton' (GPU, or TRITON_INTERPRET=1), or 'auto' "
                          "(triton on CUDA when importable, else torch).",
                  "choices": BACKENDS},
    )
    track_recall: bool = field(
        default=False,
        metadata={"help": "Record per step and layer the softmax mass captured and the fraction of keys kept "
                          "(costs a dense score pass; for evaluation only)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the key reservoir.", "min": 0})

    def validate_for_model(self, model_config: Any) -> None:
        super().validate_for_model(model_config)
        head_dim = getattr(model_config, "head_dim", None) or (
            model_config.hidden_size // model_config.num_attention_heads
        )
        if self.n_subspaces > head_dim:
            raise self.error("n_subspaces", f"must be at most the model's head_dim={head_dim}, got {self.n_subspaces}")

    def validate(self) -> None:
        """Rules across the fields of the block and certified modes (issue 19)."""
        if self.mode == "exact":
            return
        if self.recheck_max < self.recheck_every:
            raise self.error("recheck_max", f"must be at least recheck_every={self.recheck_every} in mode "
                                            f"{self.mode!r}, got {self.recheck_max}")
        if self.block_size % self.block_keys:
            raise self.error("block_keys", f"must divide block_size={self.block_size} in mode {self.mode!r}, "
                                           f"got {self.block_keys}")
        if self.cluster_keys % self.block_size:
            raise self.error("cluster_keys", f"must be a multiple of block_size={self.block_size} in mode "
                                             f"{self.mode!r}, got {self.cluster_keys}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RangeSearchConfig:
        """A config saved before modes existed (no ``mode`` key) was the exact mode: load it as such."""
        if isinstance(values, dict) and "mode" not in values:
            values = {**values, "mode": "exact"}
        return super().from_dict(values)

    def resolved_dense_fallback(self, head_dim: int) -> float:
        """dense_fallback, or the mode's measured default for this head dim when it is None."""
        return default_dense_fallback(self.mode, head_dim) if self.dense_fallback is None else self.dense_fallback


# -- the decode computation: pure tensor functions ------------------------------------------------------
def decode_key_mask(attention_mask: torch.Tensor | None, batch: int, n_keys: int) -> torch.Tensor | None:
    """Real keys of a one-token decode step from the 4D attention mask: [B, N] bool, None = all real.

    attention_mask: transformers' SDPA mask [B or 1, 1 or H, 1, N] (bool, True = attend) or additive float.
    """
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, -n_keys:]
    real = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return real.expand(batch, n_keys)  # kept even when all True: checking would be a host sync


def block_index_options(config: RangeSearchConfig) -> dict[str, Any]:
    """The `BlockIndex` options of a block- or certified-mode config (bounds only for the certified mode)."""
    return {"block_keys": config.block_keys, "flush_keys": config.block_size, "cluster_keys": config.cluster_keys,
            "window": config.window, "n_sink": config.n_sink,
            "outlier_norm": math.inf if config.outlier_norm is None else config.outlier_norm,
            "bounds": config.mode == "certified"}


def forced_keys(key_mask: torch.Tensor | None, batch: int, n_keys: int, n_sink: int, n_window: int,
                device: torch.device) -> torch.Tensor:
    """Keys attended whatever their score: [B, N] bool. Sinks are the first n_sink REAL keys of each row
    (so left padding shifts them), the window the last n_window positions; padded keys never."""
    position = torch.arange(n_keys, device=device)
    window = (position >= n_keys - n_window).expand(batch, n_keys)
    if key_mask is None:
        return window | (position < n_sink)
    sinks = key_mask & (key_mask.long().cumsum(-1) <= n_sink)
    return (window | sinks) & key_mask


def attended_pairs(
    q: torch.Tensor, keys: torch.Tensor, index: RangeSearchIndex, tau: torch.Tensor, forced: torch.Tensor,
    key_mask: torch.Tensor | None, bounds_backend: str = "torch", rows_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys each query row attends, R(q, tau) u forced, as flat pairs with exact scores.

    q [B, H_q, D], keys [B, H_kv, N, D], tau [B, H_q], forced [B, N] bool, key_mask [B, N] or None ->
    (rows [P], key_ids [P], scores [P] float32), row = b * H_q + h. The index prunes (its node bounds
    scored by ``bounds_backend``); survivors are filtered with the exact score (`pair_scores`, the same
    expression as brute force), so the set equals brute force even for a key whose score IS tau.
    rows_mask [B * H_q] bool: only these query rows (None = all).
    """
    h_q = q.shape[1]
    rows, ids = index.candidates(q, tau, backend=bounds_backend, rows_mask=rows_mask)
    batch_of = torch.div(rows, h_q, rounding_mode="floor")
    scores = pair_scores(q, keys, rows, ids)
    hit = (scores >= tau.float().reshape(-1).index_select(0, rows)) & ~forced[batch_of, ids]
    if key_mask is not None:
        hit &= key_mask[batch_of, ids]
    hit = hit.nonzero().squeeze(-1)
    f_rows, f_ids = forced_pairs(forced, h_q)
    if rows_mask is not None:
        kept = rows_mask.index_select(0, f_rows).nonzero().squeeze(-1)
        f_rows, f_ids = f_rows.index_select(0, kept), f_ids.index_select(0, kept)
    return (torch.cat([rows.index_select(0, hit), f_rows]), torch.cat([ids.index_select(0, hit), f_ids]),
            torch.cat([scores.index_select(0, hit), pair_scores(q, keys, f_rows, f_ids)]))


def forced_pairs(forced: torch.Tensor, n_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """forced [B, N] bool -> (rows [F * H_q], key_ids [F * H_q]): every forced key for every head."""
    batch_idx, key_idx = forced.nonzero(as_tuple=True)
    heads = torch.arange(n_q_heads, device=forced.device)
    return (batch_idx[:, None] * n_q_heads + heads).reshape(-1), key_idx.repeat_interleave(n_q_heads)


def threshold_dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: torch.Tensor, *,
                    forced: torch.Tensor, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The exact mode's dense scan: softmax over {k : q . k >= tau} u forced with every score from one
    grouped matmul (no K/V expansion): [B, H_q, D_v] float32. Same set as the index up to keys within float
    rounding of tau. q [B, H_q, D], keys / values [B, H_kv, N, D(_v)], tau [B, H_q], forced [B, N] bool."""
    b, h_q, d = q.shape
    h_kv, n = keys.shape[1], keys.shape[2]
    qg = q.float().reshape(b, h_kv, h_q // h_kv, d)
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)).reshape(b, h_q, n)
    keep = (scores >= tau.float()[..., None]) | forced[:, None, :]
    if key_mask is not None:
        keep &= key_mask[:, None, :]
    logits = (scores * scale).masked_fill(~keep, -math.inf)
    p = softmax(logits).reshape(b, h_kv, h_q // h_kv, n)
    return torch.matmul(p, values.float()).reshape(b, h_q, -1)


def range_search_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: RangeSearchIndex, tau: torch.Tensor, *,
    forced: torch.Tensor, key_mask: torch.Tensor | None, scale: float, backend: str = "torch",
    dense_fallback: float = 1.0,
) -> torch.Tensor:
    """Softmax attention over R(q, tau) u forced through the index: [B, H_q, D_v] float32.

    q [B, H_q, D], keys / values [B, H_kv, N, D(_v)] (the cache the index holds), tau [B, H_q] raw q . k
    units, forced [B, N] bool (`forced_keys`). A query row whose candidate fraction (from the tree's top
    level) exceeds ``dense_fallback`` takes `threshold_dense` instead of the index; 1.0 never falls back.
    backend "torch": ragged softmax over the pairs (`cpu.ragged_softmax_attention`); "triton": node bounds by
    `triton_kernels.pair_bounds` and the softmax by `triton_kernels.gathered_attention` over the already
    filtered pairs. The kernel's fused tau filter is not used: its own summation order can drop a key whose
    score equals tau, and the exact-budget tau is always some key's score.
    """
    b, h_q, _ = q.shape
    prunable = index.candidate_fraction(q, tau) <= dense_fallback
    flags = prunable.tolist()  # the one host read that decides between the index and the dense scan
    if not any(flags):
        return threshold_dense(q, keys, values, tau, forced=forced, key_mask=key_mask, scale=scale)
    rows_mask = None if all(flags) else prunable
    bounds_backend = "torch" if backend == "torch" else "triton"
    rows, ids, scores = attended_pairs(q, keys, index, tau, forced, key_mask, bounds_backend, rows_mask)
    if backend == "torch":
        out = ragged_softmax_attention(rows, ids, scores, values, h_q, scale).view(b, h_q, -1)
    else:
        out = gathered_attention(q, keys, values, pack_rows(rows, ids, b * h_q), scale=scale)
    if rows_mask is None:
        return out
    dense = threshold_dense(q, keys, values, tau, forced=forced, key_mask=key_mask, scale=scale)
    return torch.where(prunable.view(b, h_q, 1), out, dense)


# -- the graft ---------------------------------------------------------------------------------------
class RangeSearchGraft(Graft):
    """Installs range-search decode attention on the full-attention layers in ``target_layers``.

    After generation with ``track_recall`` on, ``recall_log`` holds one dict per (decode step, layer):
    ``layer``, ``n_keys``, ``mass_recall`` (fraction of the exact softmax mass on the attended keys),
    ``kept_fraction`` (attended / real keys), ``threshold_recall`` (keys above tau that were retrieved:
    1.0 by construction).
    """

    def __init__(self, config: RangeSearchConfig, base_model, patch):
        super().__init__(config, base_model, patch)
        types = patch.layer_types(base_model)
        self.layer_indices = [i for i in self.layer_indices if types[i] == "full_attention"]
        self._grafted = set(self.layer_indices)
        self._attention_name = f"graftlm_range_search_{id(self):x}"
        self._caches: dict[int, Any] = {}
        # the layers not grafted here run this: SDPA, or the attention function of a graft attached earlier
        self._delegate = sdpa_attention_forward
        self._warned_foreign_cache = False
        self.recall_log: list[dict[str, float]] = []

    # -- install / remove
    def install(self) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = self._attention_name
        self.patch.register_attention(name, self.attention, sdpa_mask)
        self.on_remove(lambda: self.patch.unregister_attention(name))
        previous = self.patch.set_attention_implementation(self.base_model, name)
        if previous.startswith("graftlm_") and previous in ALL_ATTENTION_FUNCTIONS:
            self._delegate = ALL_ATTENTION_FUNCTIONS[previous]  # another graft's (Echo's window attention)
        self.on_remove(lambda: self.patch.set_attention_implementation(self.base_model, previous))
        self.on_remove(self._caches.clear)
        layers = self.patch.decoder_layers(self.base_model)
        for i in self.layer_indices:
            attention = self.patch.attention(layers[i])
            self.add_hook(attention.register_forward_pre_hook(self._capture_cache, with_kwargs=True))
            self.add_hook(attention.register_forward_hook(self._release_cache))

    def _capture_cache(self, module, args, kwargs):
        self._caches[module.layer_idx] = cache_from_kwargs(kwargs)

    def _release_cache(self, module, args, output):
        self._caches.pop(module.layer_idx, None)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    # -- generation
    def _state_options(self) -> tuple:
        """(index_options, reservoir_size, seed, block_options) of the layer states (`RangeSearchLayerState`)."""
        c = self.config
        index_options = {"n_subspaces": c.n_subspaces, "leaf_size": c.leaf_size, "fanout": c.fanout,
                         "block_size": c.block_size}
        exact = c.mode == "exact"
        reservoir = c.reservoir_size if exact and c.threshold == "reservoir" and c.budget < 1.0 else None
        block_options = None if exact else block_index_options(c)
        return index_options, reservoir, c.seed, block_options

    def make_cache_state(self) -> RangeSearchCacheState:
        return RangeSearchCacheState(self.layer_indices, *self._state_options())

    def full_key_layers(self) -> set[int]:
        return set(self.layer_indices)

    def make_cache(self) -> RangeSearchCache:
        """A fresh `RangeSearchCache` for this model and graft alone."""
        return RangeSearchCache(self.base_model.config, self.layer_indices, *self._state_options())

    def prepare_generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Supply `make_cache()` as the cache unless the caller (or `GraftModel.generate`) passed a cache or
        disabled caching."""
        if cache_from_kwargs(kwargs) is None and kwargs.get("use_cache", True) is not False:
            return {**with_cache(kwargs, self.make_cache()), "use_cache": True}
        return kwargs

    # -- attention
    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """The registered attention function. query [B, H_q, T, D], key / value [B, H_kv, N, D] (the whole
        cache after this step's update) -> ([B, T, H_q, D_v], None), as transformers' SDPA function."""
        layer_idx = getattr(module, "layer_idx", None)
        decode = (self.active and layer_idx in self._grafted and query.shape[2] == 1
                  and key.shape[2] >= max(2, self.config.min_keys))
        cache = self._caches.get(layer_idx) if decode else None
        state = state_of(cache, STATE_KEY) if decode else None
        if decode and (state is None or layer_idx not in state.layers):
            self._warn_foreign_cache(cache)
            decode = False
        if not decode:
            dense = self._delegate if layer_idx not in self._grafted else sdpa_attention_forward
            return dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = self._decode(layer_idx, state.layers[layer_idx], query[:, :, 0], key, value, attention_mask, scale)
        return out.to(query.dtype).unsqueeze(1), None

    def _warn_foreign_cache(self, cache) -> None:
        if not self._warned_foreign_cache:
            self._warned_foreign_cache = True
            warnings.warn(
                f"range-search graft: decode with a {type(cache).__name__} holding no range-search state stays "
                "dense; use GraftModel.generate without a cache, or pass graft_model.make_cache()",
                stacklevel=3,
            )

    def _backend(self, q: torch.Tensor) -> str:
        if self.config.backend == "auto":
            return "triton" if q.is_cuda and triton_available() else "torch"
        return self.config.backend

    def _decode(self, layer_idx: int, state: RangeSearchLayerState, q, keys, values, attention_mask, scale):
        key_mask = decode_key_mask(attention_mask, q.shape[0], keys.shape[2])
        decode = self._decode_exact if self.config.mode == "exact" else self._decode_blocks
        out = decode(layer_idx, state, q, keys, values, key_mask, scale)
        state.n_queries += 1
        return out

    def _decode_exact(self, layer_idx, state: RangeSearchLayerState, q, keys, values, key_mask, scale):
        b, n = q.shape[0], keys.shape[2]
        index = state.sync(keys)
        scores = exact_scores(q, keys) if self.config.threshold == "budget" or self.config.track_recall else None
        tau = self._threshold(q, scores, key_mask, state)
        forced = forced_keys(key_mask, b, n, self.config.n_sink, self.config.window, keys.device)
        out = range_search_decode(q, keys, values, index, tau, forced=forced, key_mask=key_mask, scale=scale,
                                  backend=self._backend(q),
                                  dense_fallback=self.config.resolved_dense_fallback(q.shape[-1]))
        if self.config.track_recall:
            self._record(layer_idx, state, q, keys, index, tau, forced, key_mask, scores, scale)
        return out

    def _decode_blocks(self, layer_idx, state: RangeSearchLayerState, q, keys, values, key_mask, scale):
        """Block and certified modes (`graftlm.kernels.range_search.block_attention`)."""
        c = self.config
        schedule = state.block_schedule(c.recheck_every, c.recheck_max)
        index, plan = state.index, None
        if not schedule.plan_now():  # a dense streak: no planning, and the index catches up when it is next used
            b, h_q, d = q.shape
            qg = q.detach().float().reshape(b * keys.shape[1], h_q // keys.shape[1], d)
            out = dense_rows(qg, keys, values, key_mask, scale).reshape(b, h_q, -1)
        else:
            index = state.sync_blocks(keys, values, key_mask)
            decode = block_sparse_decode
            if self._backend(q) == "triton":
                from graftlm.kernels.range_search.triton_blocks import block_sparse_decode_triton as decode
            dense_fallback = c.resolved_dense_fallback(q.shape[-1])
            out, plan = decode(q, keys, values, index, scale=scale, mode=c.mode, mass_target=c.mass_target,
                               tolerance=c.tolerance, dense_fallback=dense_fallback, key_mask=key_mask)
            schedule.record(plan, index, dense_fallback)
        if c.track_recall:
            self._record_blocks(layer_idx, state, q, keys, index, plan, key_mask, scale)
        return out

    def _record_blocks(self, layer_idx, state, q, keys, index, plan, key_mask, scale) -> None:
        b, h_q, n = q.shape[0], q.shape[1], keys.shape[2]
        real = torch.ones(b, n, dtype=torch.bool, device=keys.device) if key_mask is None else key_mask
        if plan is None:
            attended = real[:, None, :].expand(b, h_q, n)
        else:
            attended = attended_keys(plan, index, key_mask).view(b, index.n_kv_heads, 1, n).expand(
                b, index.n_kv_heads, h_q // index.n_kv_heads, n).reshape(b, h_q, n)
        scores = exact_scores(q, keys)
        state.last = {"q": q.detach(), "attended": attended, "key_mask": real, "n_keys": n, "plan": plan}
        entry = {
            "layer": layer_idx,
            "n_keys": n,
            "mass_recall": softmax_mass_recall(scores, attended, scale, key_mask).mean().item(),
            "mass_recall_min": softmax_mass_recall(scores, attended, scale, key_mask).min().item(),
            "kept_fraction": (attended.sum(-1) / real.sum(-1, keepdim=True)).float().mean().item(),
            "dense_fraction": 1.0 if plan is None else sum(plan.dense) / len(plan.dense),
        }
        if plan is not None and plan.bound is not None:
            entry["certified_bound"] = plan.bound.max().item()
        self.recall_log.append(entry)

    def _threshold(self, q, scores, key_mask, state: RangeSearchLayerState) -> torch.Tensor:
        """tau [B, H_q] in raw q . k units."""
        if self.config.budget >= 1.0:
            return q.new_full(q.shape[:2], -math.inf, dtype=torch.float32)
        if self.config.threshold == "budget":
            return budget_threshold(scores, self.config.budget, key_mask)
        return state.reservoir.threshold(q, self.config.budget)

    def _record(self, layer_idx, state, q, keys, index, tau, forced, key_mask, scores, scale) -> None:
        rows, ids, _ = attended_pairs(q, keys, index, tau, forced, key_mask)
        b, h_q, n = scores.shape
        attended = torch.zeros(b * h_q, n, dtype=torch.bool, device=keys.device)
        attended[rows, ids] = True
        attended = attended.view(b, h_q, n)
        real = torch.ones(b, n, dtype=torch.bool, device=keys.device) if key_mask is None else key_mask
        above = (scores >= tau[..., None]) & real[:, None, :]
        n_above = above.sum(-1)
        retrieved_above = torch.where(n_above > 0, (above & attended).sum(-1) / n_above.clamp(min=1), 1.0)
        state.last = {"q": q.detach(), "tau": tau, "attended": attended, "key_mask": real, "n_keys": n}
        self.recall_log.append({
            "layer": layer_idx,
            "n_keys": n,
            "mass_recall": softmax_mass_recall(scores, attended, scale, key_mask).mean().item(),
            "kept_fraction": (attended.sum(-1) / real.sum(-1, keepdim=True)).float().mean().item(),
            "threshold_recall": retrieved_above.float().mean().item(),
        })


register_graft(RangeSearchConfig, RangeSearchGraft)
