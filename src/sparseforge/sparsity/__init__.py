"""Sparsity patterns, masks and checkers shared by every method.

``Pattern`` needs no torch, so the command line parses patterns at once; the mask
functions are imported on first use.
"""

from importlib import import_module

from .pattern import Pattern

_MASKS = ("detect_nm", "pattern_mask", "prune_count", "satisfies", "sparsity_of")

__all__ = ["Pattern", *_MASKS]


def __getattr__(name: str):
    if name in _MASKS:
        value = getattr(import_module(".masks", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparseforge.sparsity' has no attribute {name!r}")
