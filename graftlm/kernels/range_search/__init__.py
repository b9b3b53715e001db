"""Range-search attention kernels (METHODS.md section 4; arXiv 2605.06763).

Exact halfspace retrieval {k : q . k >= tau} over a KV cache through a product-ball tree index (the
paper's method), and the block index of the fast and certified modes (contiguous key blocks scored by one
matmul of block statistics; issue 19), each with a plain PyTorch reference, a vectorised CPU path and
Triton kernels (imported lazily).
"""

from .block_attention import BlockPlan, attended_keys, block_sparse_decode, dense_rows
from .blocks import BlockIndex
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
from .schedule import DenseSchedule, plan_read_fraction
from .triton_kernels import (
    gathered_attention,
    pack_rows,
    pair_bounds,
    range_search_attention_triton,
    triton_available,
)

__all__ = [
    "BlockIndex",
    "BlockPlan",
    "DenseSchedule",
    "KeyReservoir",
    "RangeSearchIndex",
    "attended_keys",
    "block_sparse_decode",
    "budget_threshold",
    "dense_rows",
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
    "plan_read_fraction",
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
