"""Sparsity patterns, masks and checkers shared by every method."""

from .masks import detect_nm, pattern_mask, prune_count, satisfies, sparsity_of
from .pattern import Pattern

__all__ = ["Pattern", "detect_nm", "pattern_mask", "prune_count", "satisfies", "sparsity_of"]
