"""Magnitude pruning: drop the smallest |W_ij| of the whole layer (or of each N:M group)."""

from __future__ import annotations

import torch

from ..sparsity.masks import pattern_mask
from ..sparsity.pattern import Pattern


def magnitude_prune(weight: torch.Tensor, pattern: Pattern, layer: str = "") -> torch.Tensor:
    """Return a pruned copy of ``weight`` (out x in)."""
    pattern.check_width(weight.shape[1], layer)
    mask = pattern_mask(weight.detach().abs().float(), pattern, per_row=False)
    return weight.detach().masked_fill(mask, 0)
