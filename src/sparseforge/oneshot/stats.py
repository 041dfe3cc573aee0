"""Input statistics of a linear layer, streamed over calibration tokens in float32."""

from __future__ import annotations

import torch

from ..errors import NumericalError

#: tokens per chunk of the squared-norm sums (1024 x 1536 floats = 6 MiB: stays in cache and in the heap)
SQ_CHUNK_ROWS = 1024
#: column block of the Gram matrix's lower triangle: X^T X is symmetric, so only the blocks on and
#: below the diagonal are multiplied (~55-65% of the full product's time at widths 576-1536)
GRAM_BLOCK = 256


def add_lower_gram(out: torch.Tensor, x: torch.Tensor) -> None:
    """``out += X^T X`` on and below the diagonal, in column blocks; the blocks above stay as they are."""
    block = GRAM_BLOCK  # read at call time (tests set a small block)
    d = x.shape[1]
    if d <= block:
        out.addmm_(x.T, x)
        return
    for start in range(0, d, block):
        out[start:, start:start + block].addmm_(x[:, start:].T, x[:, start:start + block])


def symmetric_from_lower(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is that of ``lower``; what is
    above its diagonal is ignored (``add_lower_gram`` leaves it as it was)."""
    tril = lower.tril()
    return tril + tril.tril(-1).T


class InputStats:
    """Running sums over the tokens that enter one layer (or a group sharing one input).

    ``kind`` is what the method needs: ``"sq_norms"`` (sum of x_j^2 per input
    feature, Wanda) or ``"hessian"`` (X X^T, SparseGPT; its diagonal gives the
    squared norms too). X is never stored.
    """

    def __init__(self, in_features: int, kind: str, layer: str = ""):
        if kind not in ("sq_norms", "hessian"):
            raise ValueError(f"unknown statistics kind {kind!r}")
        self.kind = kind
        self.layer = layer
        self.n_tokens = 0
        self._xtx = torch.zeros(in_features, in_features) if kind == "hessian" else None
        self._sq = torch.zeros(in_features) if kind == "sq_norms" else None

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        if self._xtx is not None:
            add_lower_gram(self._xtx, x)  # the lower triangle; hessian mirrors it
            summary = self._xtx.diagonal()
        else:
            # in row chunks: squaring all tokens at once allocates a fresh tensor as large as x
            # (page faults on every page) and streams it through memory twice; ~6x slower
            for part in x.split(SQ_CHUNK_ROWS):
                self._sq.add_(part.square().sum(dim=0))
            summary = self._sq
        # a NaN or inf anywhere in x reaches the diagonal: checking it is cheap, checking x is not
        if not torch.isfinite(summary).all():
            raise NumericalError(
                f"non-finite activations entering {self.layer}: the model overflows in its "
                "compute dtype; run in float32 (--dtype float32 --compute-dtype float32)"
            )
        self.n_tokens += x.shape[0]

    @property
    def sq_norms(self) -> torch.Tensor:
        """Sum over tokens of x_j^2, per input feature."""
        return self._xtx.diagonal().clone() if self._xtx is not None else self._sq.clone()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n X X^T (the layer-wise squared-error Hessian)."""
        if self._xtx is None:
            raise ValueError("these statistics hold no Hessian")
        return symmetric_from_lower(self._xtx).mul_(2.0 / max(self.n_tokens, 1))
