"""LoSparse layers: y = (x Vᵀ) Uᵀ + x Sᵀ + b, with S pruned by rows (output neurons).

Two forms of one reparametrised linear, both with ``in_features``, ``out_features``,
``bias`` and ``dense_weight()`` (the equivalent out x in weight):
- ``LoSparseLinear``, the training form: U, V and the full S are parameters, a
  ``row_mask`` buffer says which rows of S are kept;
- ``CompactLoSparseLinear``, the storage / inference form: only the kept rows of S
  and their indices, so the pruned rows cost neither memory nor compute.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.base import get_weight
from .decompose import svd_split


def _check_shapes(lowrank_u, lowrank_v, rows, bias, out_features: int, in_features: int, what: str) -> None:
    rank = lowrank_u.shape[1]
    if lowrank_u.shape != (out_features, rank) or lowrank_v.shape != (rank, in_features) or rows.shape[1] != in_features:
        raise ConfigError(
            f"{what}: U {tuple(lowrank_u.shape)}, V {tuple(lowrank_v.shape)} and S {tuple(rows.shape)} do not fit "
            f"a {out_features} x {in_features} layer: U must be out x r, V r x in, S rows of width in"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ConfigError(f"{what}: bias of shape {tuple(bias.shape)} must be ({out_features},), one value per output")


def _lowrank_output(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x Vᵀ) Uᵀ + b, or b (zeros without bias) when the rank is 0."""
    if lowrank_u.shape[1]:
        return F.linear(F.linear(x, lowrank_v), lowrank_u, bias)
    out = x.new_zeros(*x.shape[:-1], lowrank_u.shape[0])
    return out if bias is None else out + bias


class LoSparseLinear(nn.Module):
    """Training form: U (out x r), V (r x in), S (out x in), bias, and a persistent ``row_mask``.

    ``mask_in_forward`` True: the forward multiplies S's output by the row mask, so pruned rows
    stay pruned (no gradient reaches them; optimizer momentum may still move their stored
    values, which the mask hides: ``dense_weight`` and ``compact`` use the effective S).
    False: the reference behaviour, S is used as stored; pruned rows are zeroed by
    ``apply_row_mask`` but train in between and may come back.
    """

    def __init__(self, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, sparse: torch.Tensor, bias: torch.Tensor | None = None,
                 mask_in_forward: bool = True):
        super().__init__()
        self.out_features, self.in_features = sparse.shape
        _check_shapes(lowrank_u, lowrank_v, sparse, bias, self.out_features, self.in_features, "LoSparseLinear")
        self.lowrank_u = nn.Parameter(lowrank_u.detach().clone())
        self.lowrank_v = nn.Parameter(lowrank_v.detach().clone())
        self.sparse = nn.Parameter(sparse.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("row_mask", torch.ones(self.out_features, dtype=torch.bool, device=sparse.device), persistent=True)
        self.mask_in_forward = mask_in_forward

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int, mask_in_forward: bool = True) -> LoSparseLinear:
        """Split an ``nn.Linear`` or GPT-2 ``Conv1D`` into U V + S; outputs are unchanged until training."""
        u, v, s = svd_split(get_weight(module), rank)
        return cls(u, v, s, getattr(module, "bias", None), mask_in_forward=mask_in_forward)

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]

    def effective_sparse(self) -> torch.Tensor:
        """S as the forward uses it: masked by rows when ``mask_in_forward``."""
        return self.sparse * self.row_mask[:, None] if self.mask_in_forward else self.sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # masking the output instead of S gives the same values and gradients without an out x in temporary
        sparse_out = F.linear(x, self.sparse)
        if self.mask_in_forward:
            sparse_out = sparse_out * self.row_mask
        return _lowrank_output(x, self.lowrank_u, self.lowrank_v, self.bias) + sparse_out

    def dense_weight(self) -> torch.Tensor:
        """U V + effective S (out x in)."""
        return self.lowrank_u @ self.lowrank_v + self.effective_sparse()

    @torch.no_grad()
    def apply_row_mask(self, keep: torch.Tensor) -> None:
        """Keep the rows of S where ``keep`` (out,) is True and zero the others."""
        if keep.shape != (self.out_features,):
            raise ConfigError(f"row mask of shape {tuple(keep.shape)} must be ({self.out_features},), one flag per output row")
        keep = keep.to(device=self.row_mask.device, dtype=torch.bool)
        self.row_mask.copy_(keep)
        self.sparse.mul_(keep[:, None].to(self.sparse.dtype))

    def kept_rows(self) -> int:
        return int(self.row_mask.sum())

    def compact(self) -> CompactLoSparseLinear:
        """Only the kept rows of S plus their indices: equal to this layer in its masked form."""
        index = self.row_mask.nonzero().squeeze(1)
        bias = None if self.bias is None else self.bias.detach()
        return CompactLoSparseLinear(self.lowrank_u.detach(), self.lowrank_v.detach(), self.sparse.detach()[index], index, bias)

    def parameter_count(self) -> int:
        """Parameters of the compact form: r·(out + in) + kept rows·in (+ out for the bias)."""
        bias = 0 if self.bias is None else self.out_features
        return self.rank * (self.out_features + self.in_features) + self.kept_rows() * self.in_features + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, mask_in_forward={self.mask_in_forward}")


class CompactLoSparseLinear(nn.Module):
    """Storage / inference form: U (out x r), V (r x in), the k kept rows of S (k x in) and their
    indices ``row_index`` (k,); the forward adds x S_rowsᵀ into the kept outputs only, never
    forming an out x in tensor."""

    def __init__(self, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, sparse_rows: torch.Tensor, row_index: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = lowrank_u.shape[0], lowrank_v.shape[1]
        _check_shapes(lowrank_u, lowrank_v, sparse_rows, bias, self.out_features, self.in_features, "CompactLoSparseLinear")
        if row_index.shape != (sparse_rows.shape[0],):
            raise ConfigError(f"row_index of shape {tuple(row_index.shape)} must give one index per kept row ({sparse_rows.shape[0]})")
        self.lowrank_u = nn.Parameter(lowrank_u.detach().clone())
        self.lowrank_v = nn.Parameter(lowrank_v.detach().clone())
        self.sparse_rows = nn.Parameter(sparse_rows.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("row_index", row_index.detach().to(torch.int64).clone(), persistent=True)

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]

    @property
    def rows(self) -> int:
        return self.sparse_rows.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lowrank_output(x, self.lowrank_u, self.lowrank_v, self.bias)
        if self.rows:
            sparse_out = F.linear(x, self.sparse_rows)
            out = out.index_add_(-1, self.row_index, sparse_out.to(out.dtype))
        return out

    def dense_weight(self) -> torch.Tensor:
        weight = self.lowrank_u @ self.lowrank_v
        return weight.index_add(0, self.row_index, self.sparse_rows.to(weight.dtype))

    def structure(self) -> dict:
        """The shapes needed to rebuild an empty module (``from_structure``) before loading its state dict."""
        return {"class": "CompactLoSparseLinear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "rows": self.rows, "bias": self.bias is not None}

    @classmethod
    def from_structure(cls, structure: dict, dtype: torch.dtype = torch.float32) -> CompactLoSparseLinear:
        """An uninitialised module of the given shapes; fill it with ``load_state_dict``."""
        if structure.get("class") != "CompactLoSparseLinear":
            raise ConfigError(f"structure of class {structure.get('class')!r} is not a CompactLoSparseLinear: check the saved layout")
        out_features, in_features, rank, rows = (int(structure[k]) for k in ("out_features", "in_features", "rank", "rows"))
        return cls(
            torch.empty(out_features, rank, dtype=dtype),
            torch.empty(rank, in_features, dtype=dtype),
            torch.empty(rows, in_features, dtype=dtype),
            torch.zeros(rows, dtype=torch.int64),
            torch.empty(out_features, dtype=dtype) if structure["bias"] else None,
        )

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``dense_weight()``: the export any loader can read."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def parameter_count(self) -> int:
        """r·(out + in) + k·in (+ out for the bias); the row index is not a parameter."""
        bias = 0 if self.bias is None else self.out_features
        return self.rank * (self.out_features + self.in_features) + self.rows * self.in_features + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"rows={self.rows}, bias={self.bias is not None}")
