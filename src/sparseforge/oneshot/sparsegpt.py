"""SparseGPT (Frantar & Alistarh 2023) as a pure function of (W, H, pattern).

Columns are processed in blocks; inside a block the mask is chosen by
W_ij^2 / Hinv_jj^2 and every pruned weight's error is propagated to the
remaining columns through the upper Cholesky factor of H^-1 (OBS update),
then the block's error is applied to all later columns at once.
"""

from __future__ import annotations

import logging

import torch

from ..errors import NumericalError, PatternError
from ..sparsity.masks import nm_mask, prune_count, smallest_k_mask
from ..sparsity.pattern import Pattern

log = logging.getLogger(__name__)

# Dampening multipliers tried in turn when the Cholesky factorisation fails.
_DAMPENING_RETRIES = (1.0, 10.0, 100.0)
# columns per inner sub-block of rank-1 updates (a multiple of 4 and 8 for N:M groups)
_SUB_BLOCK = 32


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, layer: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1 with λ = dampening * mean(diag H).

    Factorised in float32 first; where that fails, in float64 (which avoids most
    spurious failures), then with 10x and 100x the dampening, then NumericalError.
    """
    H = hessian.to(torch.float32)
    if not torch.isfinite(H).all():
        raise NumericalError(
            f"non-finite Hessian for layer {layer}: the calibration activations overflowed; "
            "use float32 (--dtype float32) or check the data"
        )
    mean_diag = H.diagonal().mean()
    attempts = [(torch.float32, _DAMPENING_RETRIES[0])] + [(torch.float64, f) for f in _DAMPENING_RETRIES]
    for dtype, factor in attempts:
        damped = H.to(dtype, copy=True)
        damped.diagonal().add_(dampening * factor * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper.to(torch.float32)
        if dtype == torch.float64:
            log.warning("Cholesky failed for %s with dampening %g; retrying with more", layer, dampening * factor)
    raise NumericalError(
        f"Cholesky factorisation of the Hessian of {layer} failed even with dampening "
        f"{dampening * _DAMPENING_RETRIES[-1]:g}: give more or more varied calibration data, or raise --dampening"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    row_splits: list[int] | None = None,
    layer: str = "",
) -> torch.Tensor:
    """Prune ``weight`` (out x in) to ``pattern`` minimising ||W X - W' X||^2 for H = X X^T.

    ``row_splits`` lets layers that share one Hessian (q, k, v) be solved as one
    stacked matrix while each keeps its own exact sparsity: unstructured counts
    are chosen per split. Rows never interact in the update, so stacking changes
    nothing else. Unstructured: in every column block, over all rows of a split,
    the ``k`` lowest-scoring weights are pruned, with ``k`` from cumulative
    rounding so each split ends with exactly round(s * numel) zeros.
    """
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    pattern.check_width(cols, layer)
    if pattern.is_nm and (block_size % pattern.m or _SUB_BLOCK % pattern.m):
        raise PatternError(f"N:M with M={pattern.m} needs M to divide {_SUB_BLOCK} and the block size {block_size}")
    if not pattern.is_nm and pattern.sparsity == 0:
        return W
    H = hessian.to(torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # a dead input never contributes: its weights can go at no cost
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, dampening, layer)
    splits = row_splits or [rows]
    bounds = torch.tensor([0, *splits]).cumsum(0).tolist()
    if bounds[-1] != rows:
        raise ValueError(f"row_splits {splits} do not add up to {rows} rows")

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            scores = W1.square() / d.square()[None, :]
            mask1 = torch.empty_like(W1, dtype=torch.bool)
            for r0, r1 in zip(bounds[:-1], bounds[1:]):
                seg = r1 - r0
                k = prune_count(seg * i2, pattern.sparsity) - prune_count(seg * i1, pattern.sparsity)
                mask1[r0:r1] = smallest_k_mask(scores[r0:r1], k)
        count = i2 - i1
        # two-level lazy updates: rank-1 updates stay inside a narrow sub-block, the
        # rest of the block gets one matrix update per sub-block (same arithmetic)
        for j1 in range(0, count, _SUB_BLOCK):
            j2 = min(j1 + _SUB_BLOCK, count)
            for i in range(j1, j2):
                if pattern.is_nm and i % pattern.m == 0:
                    group = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()[None, :]
                    mask1[:, i : i + pattern.m] = nm_mask(group, pattern.n, pattern.m)
                w = W1[:, i]
                q = w.masked_fill(mask1[:, i], 0.0)
                Q1[:, i] = q
                err = (w - q) / d[i]
                W1[:, i:j2].addr_(err, Hinv1[i, i:j2], alpha=-1.0)
                Err1[:, i] = err
            if j2 < count:
                W1[:, j2:].addmm_(Err1[:, j1:j2], Hinv1[j1:j2, j2:], alpha=-1.0)
        W[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    if not torch.isfinite(W).all():
        raise NumericalError(f"SparseGPT produced non-finite weights for {layer}: raise --dampening")
    return W
