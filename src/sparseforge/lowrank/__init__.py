"""LoSparse (paper 001): each linear as low-rank U V plus a row-pruned sparse S, and its importance scores."""

from .decompose import lowrank_parameters, rank_for_ratio, svd_split
from .importance import RowSensitivity, global_row_mask, sensitivity
from .layers import CompactLoSparseLinear, LoSparseLinear

__all__ = [
    "CompactLoSparseLinear",
    "LoSparseLinear",
    "RowSensitivity",
    "global_row_mask",
    "lowrank_parameters",
    "rank_for_ratio",
    "sensitivity",
    "svd_split",
]
