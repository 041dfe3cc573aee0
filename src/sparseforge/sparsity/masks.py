"""Mask building from scores, and checkers. Masks are boolean, True = pruned."""

from __future__ import annotations

import math

import torch

from .pattern import Pattern


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity asks to prune (round half up)."""
    return int(math.floor(sparsity * numel + 0.5))


def smallest_k_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Mark exactly the ``k`` smallest scores (over the whole tensor, or along ``dim`` per slice).

    Ties at the threshold are broken by position (first ones pruned).
    """
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        flat = scores.reshape(-1)
        if k >= flat.numel():
            return ~mask
        # selection, not sorting: kthvalue is linear in the size where topk(k ~ n/2) is not
        threshold = torch.kthvalue(flat, k).values
        below = flat < threshold
        ties = (flat == threshold).nonzero().squeeze(1)[: k - int(below.sum())]
        below[ties] = True
        return below.reshape(scores.shape)
    else:
        idx = torch.topk(scores, k, dim=dim, largest=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the lowest ``sparsity`` fraction of a 2-D score matrix, per layer or per row.

    Per row, the counts come from cumulative rounding (rows differ by at most one)
    so the layer as a whole still has exactly round(sparsity * numel) zeros.
    """
    if not per_row:
        return smallest_k_mask(scores, prune_count(scores.numel(), sparsity))
    rows, cols = scores.shape
    bounds = torch.tensor([prune_count(r * cols, sparsity) for r in range(rows + 1)])
    counts = bounds[1:] - bounds[:-1]  # k or k + 1 per row
    k = int(counts.min())
    if int(counts.max()) == 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    if k >= cols:
        return torch.ones(scores.shape, dtype=torch.bool)
    # per-row selection (kthvalue is linear in the row length; sorting is not)
    thresholds = torch.kthvalue(scores, max(k, 1), dim=1).values
    if int(counts.max()) > k:
        upper = torch.kthvalue(scores, k + 1, dim=1).values
        thresholds = torch.where(counts > k, upper, thresholds)
    thresholds = thresholds[:, None]
    # the usual case: no ties at the threshold, so "at most the threshold" is each row's count exactly
    mask = scores <= thresholds
    if torch.equal(mask.sum(dim=1), counts):
        return mask
    mask = scores < thresholds
    # ties at the threshold: the first ones by position, up to each row's count
    ties = scores == thresholds
    needed = (counts - mask.sum(dim=1))[:, None]
    return mask | (ties & (ties.cumsum(dim=1) <= needed))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row, in each group of ``m`` consecutive columns, prune the ``m - n`` smallest."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    return smallest_k_mask(grouped, m - n, dim=2).reshape(rows, cols)


def pattern_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """The pruned-mask a pattern selects from scores (higher score = more important)."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.sparsity, per_row=per_row)


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / weight.numel()


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive inputs in every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzeros = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return bool((nonzeros <= n).all())


def satisfies(weight: torch.Tensor, pattern: Pattern) -> bool:
    """The checker for every pattern: N:M groups, or at least the requested zero count."""
    if pattern.is_nm:
        return satisfies_nm(weight, pattern.n, pattern.m)
    return int((weight == 0).sum()) >= prune_count(weight.numel(), pattern.sparsity)


def detect_nm(weight: torch.Tensor, group_sizes=(4, 8, 16)) -> str | None:
    """The sparsest N:M pattern (N < M) that a weight satisfies, e.g. ``"2:4"``, or None."""
    best = None
    for m in group_sizes:
        rows, cols = weight.shape
        if cols % m:
            continue
        n = int((weight.reshape(rows, cols // m, m) != 0).sum(dim=2).max())
        if n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return f"{best[0]}:{best[1]}" if best else None
