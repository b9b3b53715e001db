"""Range-search attention kernels (METHODS.md section 4; arXiv 2605.06763).

Exact halfspace retrieval {k : q . k >= tau} over a KV cache through a product-ball tree index,
with a plain PyTorch reference, a vectorised CPU path and Triton kernels (imported lazily).
"""

from .cpu import ragged_softmax_attention, range_search_attention_cpu, retrieve_pairs
from .index import RangeSearchIndex, pair_scores, pca_tree_order, safety_eps
from .reference import (
    budget_threshold,
    exact_scores,
    forced_positions,
    halfspace_mask,
    kept_mask,
    masked_softmax_attention,
    range_search_attention_ref,
    sample_threshold,
    softmax_mass_recall,
    threshold_recall,
)
from .reservoir import KeyReservoir
from .triton_kernels import (
    gathered_attention,
    pack_rows,
    pair_bounds,
    range_search_attention_triton,
    triton_available,
)

__all__ = [
    "KeyReservoir",
    "RangeSearchIndex",
    "budget_threshold",
    "exact_scores",
    "forced_positions",
    "gathered_attention",
    "halfspace_mask",
    "kept_mask",
    "masked_softmax_attention",
    "pack_rows",
    "pair_bounds",
    "pair_scores",
    "pca_tree_order",
    "ragged_softmax_attention",
    "range_search_attention_cpu",
    "range_search_attention_ref",
    "range_search_attention_triton",
    "retrieve_pairs",
    "safety_eps",
    "sample_threshold",
    "softmax_mass_recall",
    "threshold_recall",
    "triton_available",
]
