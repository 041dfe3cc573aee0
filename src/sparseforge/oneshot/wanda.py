"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from ..sparsity.masks import pattern_mask
from ..sparsity.pattern import Pattern


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 with ``input_sq_norms[j] = sum over tokens of x_j^2``."""
    return weight.detach().float().abs() * input_sq_norms.float().clamp_min(0).sqrt()[None, :]


def wanda_prune(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, pattern: Pattern, layer: str = ""
) -> torch.Tensor:
    """Return a pruned copy of ``weight``; no weight update (per-row or per-N:M-group choice)."""
    pattern.check_width(weight.shape[1], layer)
    mask = pattern_mask(wanda_scores(weight, input_sq_norms), pattern, per_row=True)
    return weight.detach().masked_fill(mask, 0)
