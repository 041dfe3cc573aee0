"""The LoSparse split of a weight: W = U V + S with U V its best rank-r approximation (METHODS.md section 5)."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

# relative slack before ceil: ratio·out·in/(out+in) that is an integer up to float noise must not round up
_CEIL_SLACK = 1e-9


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """r = ceil(ratio·out·in/(out+in)): the rank whose factors hold ``ratio`` of the matrix's parameters,
    clamped to [0, min(out, in)]."""
    if not 0 <= ratio <= 1:
        raise ConfigError(f"low-rank ratio {ratio} must be in [0, 1]: it is a fraction of the matrix's parameters, e.g. 0.05")
    exact = ratio * out_features * in_features / (out_features + in_features)
    rank = math.ceil(exact - _CEIL_SLACK * max(1.0, exact))
    return max(0, min(rank, out_features, in_features))


def lowrank_parameters(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of the factors U (out x r) and V (r x in)."""
    return rank * (out_features + in_features)


def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, S) with U = U_r Σ_r^½ (out x r), V = Σ_r^½ V_rᵀ (r x in), S = W − U V, in ``weight``'s dtype.

    The SVD runs in float64; S is computed from the rounded factors in the weight's dtype, so
    U @ V + S reproduces W to that dtype's rounding (the layer's initial output equals the original's).
    """
    if weight.dim() != 2:
        raise ConfigError(f"svd_split needs a 2-D (out x in) weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not 0 <= rank <= min(out_features, in_features):
        raise ConfigError(
            f"rank {rank} must be in [0, {min(out_features, in_features)}] for a {out_features} x {in_features} matrix: "
            "lower the low-rank ratio"
        )
    w = weight.detach()
    if rank == 0:
        return w.new_zeros(out_features, 0), w.new_zeros(0, in_features), w.clone()
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    U = (u[:, :rank] * root).to(w.dtype)
    V = (root[:, None] * vh[:rank]).to(w.dtype)
    S = w - U @ V
    return U.contiguous(), V.contiguous(), S
