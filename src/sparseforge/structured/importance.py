"""Scoring couples and their units: coupled Fisher, coupled L1, and the ablations' scores.

Coupled Fisher (TranSpa eq. 6), accumulated over a round of training batches:

    Î(couple) = mean_{k ∈ couple} (1 / |W_k|) Σ_ij (∂L/∂W_k)²_ij / |D|

where W_k is the couple's OWN slice of matrix k (the rows / columns its members index,
weights only, no bias) and |D| the number of batches accumulated. The paper writes ½ Σ
over its two matrices, i.e. their mean; a SwiGLU FFN couple has three (gate, up, down)
and is averaged over three, so FFN couples are not favoured 1.5x against attention ones.

Coupled L1 unit score (eq. 9): ``v_u = (Σ_{side-0 members} ‖slice_u‖₁) · (Σ_{side-1
members} ‖slice_u‖₁)``, normalised to sum 1. For SwiGLU this is
``(‖gate_j‖₁ + ‖up_j‖₁) · ‖down_j‖₁``: gate and up are both the "W₁" of neuron j (its
input side), so their L1 norms add; for a rotary QK pair it is the L1 of the pair's
rows of every query head of the group times the L1 of the pair's two key rows.

Ablations: ``structured_l1_scores`` (uncoupled row/column removal) scores a unit by the
L1 norm of its side-0 slices ONLY (the rows the unit occupies in the matrices that
produce it: gate + up, q, v), ignoring the partner matrix — exactly the coupling the
ablation removes; ``magnitude_scores`` replaces Fisher by the mean |w| of the couple's
slices (L1-only estimation); ``tsvd`` is the truncated-SVD factorisation of a coupled
product that inspired eq. 9.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..models import get_weight
from .couples import Couple, build_couples


def _out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor (weight or its grad) in out x in layout."""
    return tensor.T if isinstance(module, Conv1D) else tensor


def _line_sums(model: nn.Module, couples: Iterable[Couple], values) -> dict[tuple[str, int], torch.Tensor]:
    """(layer, dim) -> float64 sums of ``values(module)`` (an out x in tensor) over each row (dim 0) or
    column (dim 1), for every (layer, dim) the couples' members use; one layer's tensor lives at a time."""
    dims: dict[str, set[int]] = {}
    for couple in couples:
        for m in couple.members:
            dims.setdefault(m.layer, set()).add(m.dim)
    sums = {}
    for layer, needed in dims.items():
        matrix = values(layer, model.get_submodule(layer))
        for dim in needed:
            sums[(layer, dim)] = matrix.sum(1 - dim, dtype=torch.float64).cpu()
    return sums


def _slice_sum(sums: dict, member) -> torch.Tensor:
    """(units,) sums over each unit's rows / columns of one member."""
    return sums[(member.layer, member.dim)][member.index].sum(1)


def _absolute(layer: str, module: nn.Module) -> torch.Tensor:
    return get_weight(module).detach().abs()


def _squared_grad(layer: str, module: nn.Module) -> torch.Tensor:
    grad = module.weight.grad
    if grad is None:
        raise ConfigError(f"{layer} has no gradient: accumulate the Fisher after backward and before zero_grad")
    return _out_in(module, grad).detach().float().pow(2)


def _couple_means(model: nn.Module, couples: Iterable[Couple], sums: dict) -> dict[str, float]:
    """Couple -> mean over its members of (Σ over the member's slice) / (slice size)."""
    return {c.name: sum(float(_slice_sum(sums, m).sum()) / _member_numel(model, m) for m in c.members) / len(c.members)
            for c in couples}


def _member_numel(model: nn.Module, member) -> int:
    weight = get_weight(model.get_submodule(member.layer))
    return member.index.numel() * weight.shape[1 - member.dim]


class CoupledFisher:
    """Accumulates the coupled empirical Fisher Î of every couple over a round.

    Call ``accumulate(model)`` after each backward (before the optimizer step, while
    ``.grad`` holds the batch's gradients), ``scores()`` at the end of the round, then
    ``reset()`` (always after shrinking the model: the couples are rebuilt from the new
    shapes at the next ``accumulate``).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._couples: list[Couple] | None = None
        self._shapes: tuple = ()
        self._sums: dict[str, float] = {}
        self.batches = 0

    @staticmethod
    def _signature(model: nn.Module, couples: list[Couple]) -> tuple:
        layers = dict.fromkeys(layer for c in couples for layer in c.layers)
        return tuple(tuple(model.get_submodule(layer).weight.shape) for layer in layers)

    def _current_couples(self, model: nn.Module) -> list[Couple]:
        if self._couples is None:
            self._couples = build_couples(model)
            self._shapes = self._signature(model, self._couples)
        elif self._signature(model, self._couples) != self._shapes:
            raise ConfigError("the model's shapes changed since the Fisher round began: call reset() after every apply_plan")
        return self._couples

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Add one batch: Σ (∂L/∂W)² over each member's slice, divided by the slice size."""
        couples = self._current_couples(model)
        for name, value in _couple_means(model, couples, _line_sums(model, couples, _squared_grad)).items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self.batches += 1

    def scores(self) -> dict[str, float]:
        """Couple name -> Î (mean over its matrices of the per-entry mean squared gradient, per batch)."""
        if not self.batches:
            raise ConfigError("no batch accumulated yet: call accumulate(model) after backward during the round")
        return {name: value / self.batches for name, value in self._sums.items()}

    def state_dict(self) -> dict:
        return {"sums": dict(self._sums), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self._couples = None
        self._sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        self.batches = int(state.get("batches", 0))


def _side_l1(model: nn.Module, couple: Couple, sides: Iterable[int]) -> list[torch.Tensor]:
    sums = _line_sums(model, [couple], _absolute)
    return [sum((_slice_sum(sums, m) for m in couple.members if m.side == side), torch.zeros(couple.units, dtype=torch.float64))
            for side in sides]


def normalised(v: torch.Tensor) -> torch.Tensor:
    """Unit scores that sum to 1; uniform if every score is 0."""
    total = v.sum()
    return v / total if total > 0 else torch.full_like(v, 1.0 / max(len(v), 1))


@torch.no_grad()
def unit_scores(model: nn.Module, couple: Couple) -> torch.Tensor:
    """Coupled L1 score of each unit (float64, sums to 1; uniform if every product is 0)."""
    side0, side1 = _side_l1(model, couple, (0, 1))
    return normalised(side0 * side1)


@torch.no_grad()
def structured_l1_scores(model: nn.Module, couple: Couple) -> torch.Tensor:
    """Uncoupled baseline: each unit scored by the L1 norm of its side-0 slices only, normalised."""
    (side0,) = _side_l1(model, couple, (0,))
    return normalised(side0)


UNIT_SCORERS = {"coupled-l1": unit_scores, "structured-l1": structured_l1_scores}


@torch.no_grad()
def magnitude_scores(model: nn.Module, couples: list[Couple] | None = None) -> dict[str, float]:
    """L1-only couple estimation (ablation of Fisher): mean over the couple's matrices of the mean |w| of its slice."""
    couples = couples if couples is not None else build_couples(model)
    return _couple_means(model, couples, _line_sums(model, couples, _absolute))


def tsvd(side0: torch.Tensor, side1: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of a coupled product (Eckart-Young).

    ``side0`` (inner x a) produces the inner dimension (rows = units), ``side1`` (b x inner)
    consumes it (columns = units), both out x in. Returns (rank x a, b x rank) factors
    ``U_r Σ_r^½`` and ``Σ_r^½ V_rᵀ`` (transposed to this layout) whose product
    ``side1' @ side0'`` is the truncated SVD of ``side1 @ side0``.
    """
    if side0.shape[0] != side1.shape[1]:
        raise ConfigError(f"tsvd: side 0 has {side0.shape[0]} inner rows, side 1 {side1.shape[1]} inner columns: they must match")
    if not 0 <= rank <= min(side1.shape[0], side0.shape[1]):
        raise ConfigError(f"tsvd rank {rank} must be between 0 and {min(side1.shape[0], side0.shape[1])}")
    product = side1.double() @ side0.double()
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root).to(side1.dtype)  # b x rank
    right = (root[:, None] * vh[:rank]).to(side0.dtype)  # rank x a
    return right, left
