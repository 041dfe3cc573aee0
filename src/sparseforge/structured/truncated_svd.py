"""The tSVD ablation of TranSpa (METHODS.md §6): truncated SVD of each coupled product.

A couple shares one inner dimension between the matrices that produce it (side 0) and
those that consume it (side 1). Stack, per unit u, everything the unit touches on each
side — the unit's row of every side-0 member (with its bias entry) and its column of
every side-1 member, one block per slot (a GQA group's query heads, a rotary pair's two
rows) — into ``A0`` (units x L0) and ``A1`` (units x L1). The coupled product is
``P = A1ᵀ A0``; any invertible change of inner basis ``A0 → T A0``, ``A1 → T⁻ᵀ A1``
leaves it unchanged, so the best rank-r couple (Eckart-Young) is the SVD's: position u
of the couple holds singular direction u, ``A0' = S^½ Vᵀ``, ``A1' = S^½ Uᵀ``, and
removing the last units (the smallest σ) is the truncation.

- VO couples are linear between V and O (attention mixes tokens, not value dims), so the
  rotation is exact and the truncation optimal for the product the couple computes.
- FFN couples have a nonlinearity between the sides: the rotation changes what the
  couple computes, even before any unit is removed. That is the ablation: the product
  ``W_out W_in`` ignores the nonlinearity (why the paper scores units instead, eq. 9).
- QK couples with rotary embeddings have a PINNED basis: RoPE rotates each pair
  (j, j + d/2) by its own frequency, and mixing pairs breaks that. Averaged over the
  relative rotation, the pair's term ``Q_jᵀ R K_j`` has squared Frobenius norm
  ``‖Q_j‖²‖K_j‖²/2`` and different frequencies' terms are orthogonal, so the truncation
  RoPE allows keeps the pairs with the largest ``‖A0_u‖·‖A1_u‖``; no rotation.
  Without rotary embeddings (GPT-2, OPT, BERT) QK couples rotate like VO.

How many units a selected couple loses is the paper's: the θ rule on its coupled L1 unit
masses (eq. 9). Which go is tSVD's: ``spectrum`` lays those masses, largest first, on the
units from the strongest singular direction down, so the θ rule removes exactly as many
units as on the L1 masses, and they are the weakest directions. (A θ rule on the
singular values themselves would not follow TranSpa's trajectory: an FFN's product
``W_down [W_gate | W_up]`` has rank at most the hidden size, so on SmolLM2 two thirds of
every FFN would carry no mass and go in one round.) ``rotate_couples`` rewrites, just
before the surgery, every couple the plan shrinks. The rotated slices' AdamW moments
are reset: exp_avg to 0 (no direction is known in the new basis), exp_avg_sq to the
mean of the old slice's (so the next steps keep the matrix's step size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..models import get_weight
from .couples import Couple, Member, block_attention, build_couples
from .importance import unit_scores


def _bias(module: nn.Module, member: Member):
    return getattr(module, "bias", None) if member.dim == 0 else None


def _blocks(model: nn.Module, couple: Couple, side: int) -> list[torch.Tensor]:
    """Per member of ``side`` and per slot: the (units x length) float64 block of what each unit touches."""
    blocks = []
    for m in couple.members:
        if m.side != side:
            continue
        module = model.get_submodule(m.layer)
        weight = get_weight(module).detach().double()
        bias = _bias(module, m)
        for s in range(m.index.shape[1]):
            rows = m.index[:, s]
            if m.dim == 0:
                block = weight[rows]
                if bias is not None:
                    block = torch.cat([block, bias.detach().double()[rows, None]], 1)
            else:
                block = weight[:, rows].T
            blocks.append(block)
    return blocks


def side_matrices(model: nn.Module, couple: Couple) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, A1): units x L0 and units x L1, so the coupled product is ``A1ᵀ A0``."""
    return tuple(torch.cat(_blocks(model, couple, side), 1) for side in (0, 1))


def pinned(model: nn.Module, couple: Couple) -> bool:
    """True if the couple's inner basis cannot rotate: a QK couple under rotary embeddings."""
    return couple.kind == "qk" and block_attention(model, couple.block).layout.rope


def _core(a0: torch.Tensor, a1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q0, Q1, C) with ``A1ᵀ A0 = Q1 C Q0ᵀ``: C (k1 x k0, k ≤ units) carries the product's spectrum."""
    q0, r0 = torch.linalg.qr(a0.T)  # L0 x k0, k0 x units
    q1, r1 = torch.linalg.qr(a1.T)
    return q0, q1, r1 @ r0.T


def _factors(a0: torch.Tensor, a1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ, A0', A1') with ``A1'ᵀ A0' = A1ᵀ A0``, rows in descending σ, padded with zero rows to ``units``."""
    units = a0.shape[0]
    q0, q1, core = _core(a0, a1)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    root = s.sqrt()
    new0 = torch.zeros_like(a0)
    new1 = torch.zeros_like(a1)
    rank = min(len(s), units)
    new0[:rank] = (root[:, None] * (vh @ q0.T))[:rank]
    new1[:rank] = (root[:, None] * (u.T @ q1.T))[:rank]
    sigma = torch.zeros(units, dtype=torch.float64)
    sigma[:rank] = s[:rank]
    return sigma, new0, new1


def strength(model: nn.Module, couple: Couple) -> torch.Tensor:
    """What orders a couple's units for tSVD: σ_u at position u (the position after ``rotate_couple``); for a
    pinned couple each unit's ‖A0_u‖·‖A1_u‖."""
    a0, a1 = side_matrices(model, couple)
    if pinned(model, couple):
        return a0.norm(dim=1) * a1.norm(dim=1)
    sigma = torch.zeros(a0.shape[0], dtype=torch.float64)
    values = torch.linalg.svdvals(_core(a0, a1)[2])  # the spectrum alone: no factors to build
    sigma[:len(values)] = values
    return sigma


@torch.no_grad()
def spectrum(model: nn.Module, couple: Couple) -> torch.Tensor:
    """The unit score of the tSVD ablation: the couple's coupled L1 masses (sum 1), largest first, laid on its
    units by descending ``strength``; a 1e-12 slope breaks ties so that the weakest direction of equal mass
    goes first."""
    ranks = torch.sort(strength(model, couple), descending=True, stable=True).indices
    masses = torch.sort(unit_scores(model, couple), descending=True).values
    masses = masses - 1e-12 * torch.arange(len(masses), dtype=masses.dtype) / max(len(masses), 1)
    out = torch.empty_like(masses)
    out[ranks] = masses
    return out


def _reset_moments(state: dict | None, rows: torch.Tensor, dim: int) -> None:
    if not state:
        return
    for key, value in list(state.items()):
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        view = value if dim == 0 else value.T
        if key == "exp_avg":
            view[rows] = 0
        elif key in ("exp_avg_sq", "max_exp_avg_sq"):
            view[rows] = view[rows].mean()


def _write(model: nn.Module, couple: Couple, side: int, matrix: torch.Tensor, optimizer=None) -> None:
    """Write ``matrix`` (units x L, the layout of ``side_matrices``) back into the side's members."""
    opt = getattr(optimizer, "optimizer", optimizer)
    col = 0
    for m in couple.members:
        if m.side != side:
            continue
        module = model.get_submodule(m.layer)
        weight = get_weight(module)  # a view in the module's own storage (Conv1D: transposed)
        bias = _bias(module, m)
        width = weight.shape[1] if m.dim == 0 else weight.shape[0]
        for s in range(m.index.shape[1]):
            rows = m.index[:, s].to(weight.device)
            block = matrix[:, col:col + width]
            col += width
            if m.dim == 0:
                weight[rows] = block.to(weight.dtype)
                if bias is not None:
                    bias.data[rows] = matrix[:, col].to(bias.dtype)
                    col += 1
            else:
                weight[:, rows] = block.T.to(weight.dtype)
            state = opt.state.get(module.weight) if opt is not None else None
            _reset_moments(state, rows, (1 - m.dim) if isinstance(module, Conv1D) else m.dim)  # Conv1D: in x out
            if bias is not None:
                _reset_moments(opt.state.get(bias) if opt is not None else None, rows, 0)


@torch.no_grad()
def rotate_couple(model: nn.Module, couple: Couple, optimizer=None) -> bool:
    """Rewrite a couple in the SVD basis of its product (position u = singular direction u); False if pinned."""
    if pinned(model, couple):
        return False
    a0, a1 = side_matrices(model, couple)
    _, new0, new1 = _factors(a0, a1)
    _write(model, couple, 0, new0, optimizer)
    _write(model, couple, 1, new1, optimizer)
    return True


def rotate_couples(model: nn.Module, units: Mapping[str, Sequence[int]], optimizer=None) -> list[str]:
    """Rotate the couples a plan is about to shrink (couple name -> units it removes), except those it removes
    whole; returns the names rotated."""
    return [c.name for c in build_couples(model)
            if 0 < len(units.get(c.name, ())) < c.units and rotate_couple(model, c, optimizer)]
