"""Adapter layers around a frozen (sparse) linear layer: SPP and LoRA.

The contract follows PEFT's tuner layers: an adapter wraps its base layer,
adds a learnable delta in ``forward`` (``unmerged_forward``), and can ``merge``
the delta into the base weight (``unmerge`` undoes it); ``delta_weight()`` is
the dense delta.
The base layer may be an ``nn.Linear`` or GPT-2's ``Conv1D``: its weight is
read and written through the adapters' ``get_weight``/``set_weight`` (always
out x in).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.base import get_weight, set_weight

log = logging.getLogger(__name__)


def rows_per_block(out_features: int, rank: int) -> tuple[int, int]:
    """(blocks, rows per block) for SPP: the largest divisor of ``out_features`` that is <= ``rank``."""
    blocks = max(d for d in range(1, min(rank, out_features) + 1) if out_features % d == 0)
    return blocks, out_features // blocks


class AdapterLinear(nn.Module, ABC):
    """A frozen base layer plus a learnable delta; subclasses define the delta and
    how the unmerged layer computes its output."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, out x in (a view for Conv1D)."""
        return get_weight(self.base)

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The dense (out x in) delta the adapter adds to the base weight."""

    @abstractmethod
    def unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with the delta not yet merged into the base weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) if self.merged else self.unmerged_forward(x)

    def merged_weight(self) -> torch.Tensor:
        """W + delta, summed in at least float32 and stored in W's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.to(dtype) + self.delta_weight().to(dtype)).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, keep_original: bool = True) -> None:
        """Write the delta into the base weight. ``safe_merge`` checks it is finite first.
        ``keep_original`` keeps a copy of the base weight for ``unmerge`` (exact even where
        LoRA* masked the delta); merge-and-unload passes False, as nothing will unmerge."""
        if self.merged:
            return
        new = self.merged_weight()
        if safe_merge and not torch.isfinite(new).all():
            raise ConfigError("merging the adapter gives non-finite weights: lower the learning rate")
        if keep_original:
            self._unmerged = self.weight.detach().clone()
        set_weight(self.base, new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if not hasattr(self, "_unmerged"):
            raise ConfigError("this adapter was merged without keeping the original weight: it cannot be unmerged")
        set_weight(self.base, self._unmerged)
        del self._unmerged
        self.merged = False

    def adapter_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}


def _spp_weight(weight, alpha, beta, scale: float, rows: int) -> torch.Tensor:
    """W + scale·(A ⊙ β ⊙ W), A = α repeated over row blocks of ``rows`` rows.

    Computed in one out x in buffer, with A broadcast instead of materialised: the
    chain of full-size temporaries a direct expression makes, once per layer per
    forward and again in backward, left glibc holding memory it did not reuse
    (measured on SmolLM2, one step at 64 tokens: ~0.2 GB more peak RSS). Same
    operations in the same order as the direct expression, so the same bits."""
    blocks, width = alpha.shape
    w = weight.reshape(blocks, rows, width)  # a copy only for GPT-2's transposed Conv1D weight
    out = (alpha * scale)[:, None, :] * beta.view(blocks, rows, 1)
    return out.mul_(w).add_(w).view(blocks * rows, width)


class _SPPTrainingLinear(torch.autograd.Function):
    """``y = x W'ᵀ + b`` with W' = W + scale·(A ⊙ β ⊙ W), saving only x for backward.

    One matmul forward, two backward (the input gradient and the out x in gradient
    of W', reduced to α and β), like a dense linear layer. W' is rebuilt in backward
    instead of kept, so the saved state per layer is the input alone (plain
    autograd would keep W', the repeated A and their products: several out x in
    tensors per layer; the block-wise form would keep r scaled copies of x).
    Under autocast the matmuls run in the autocast dtype; α and β's gradients
    are accumulated in float32. Full-size temporaries are kept to one or two
    live at a time (in-place updates, A broadcast), see ``_spp_weight``.
    """

    @staticmethod
    def forward(ctx, x, weight, alpha, beta, bias, scale, rows):
        with torch.no_grad():
            merged = _spp_weight(weight.to(alpha.dtype), alpha, beta, scale, rows).to(weight.dtype)
        device = x.device.type
        ctx.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.scale, ctx.rows, ctx.has_bias = scale, rows, bias is not None
        ctx.save_for_backward(x, weight, alpha, beta)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, alpha, beta = ctx.saved_tensors
        scale, rows = ctx.scale, ctx.rows
        blocks, width = alpha.shape
        dtype = ctx.autocast_dtype or torch.promote_types(x.dtype, weight.dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            merged = _spp_weight(weight.to(alpha.dtype), alpha, beta, scale, rows).to(dtype)
            grad_x = (g @ merged).reshape(x.shape).to(x.dtype)
            del merged
        acc = torch.promote_types(alpha.dtype, torch.float32)  # at least float32 for the reductions
        grad_merged = (g.T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(acc)  # out x in
        weighted = grad_merged.mul_(weight.to(acc)).mul_(scale).view(blocks, rows, width)  # dL/dW' ⊙ W · scale
        grad_alpha = (weighted * beta.to(acc).view(blocks, rows, 1)).sum(1)
        grad_beta = (weighted * alpha.to(acc)[:, None, :]).sum(2).view(-1)
        grad_bias = g.sum(0).to(grad_out.dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return grad_x, None, grad_alpha.to(alpha.dtype), grad_beta.to(beta.dtype), grad_bias, None, None


class SPPLinear(AdapterLinear):
    """SPP (paper 003, METHODS.md section 4): ``W' = W + scale·(A ⊙ β ⊙ W)``.

    ``α`` (r x in) is repeated over the output rows in r contiguous blocks and
    ``β`` (out) scales each row, so the delta is the base weight times a learned
    factor: every zero of W stays zero, in training and after merging. When
    ``out`` is not divisible by ``rank``, the largest divisor below it is used
    (a warning says so): the blocks must tile the rows exactly.

    Three forward forms, equal to rounding (tested):
    - training (``forward`` with grad enabled): one matmul with W' and a custom
      backward that saves only the input (see ``_SPPTrainingLinear``);
    - ``blockwise_forward`` (METHODS.md's memory-lean form, used without grad):
      ``x Wᵀ`` plus row block k of W applied to ``x ⊙ α_k``; no out x in
      temporary, which suits inference with few tokens. Under autograd it
      would keep r scaled copies of x per layer (measured: 20 GB peak for
      SmolLM2-135M at 4 x 512 tokens), which is why training does not use it;
    - ``naive_forward``: the full delta materialised, for the tests.
    """

    def __init__(self, base: nn.Module, rank: int = 16, scale: float = 1.0, seed: int | None = None):
        super().__init__(base)
        out_features, in_features = self.weight.shape
        blocks, self.rows = rows_per_block(out_features, rank)
        if blocks != rank:
            log.warning("SPP: %d output rows are not divisible by rank %d; using %d blocks of %d rows",
                        out_features, rank, blocks, self.rows)
        self.rank, self.scale = blocks, scale
        w = self.weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # trained in float32 even on a bf16/fp16 base
        self.alpha = nn.Parameter(torch.empty(blocks, in_features, dtype=dtype, device=w.device))
        self.beta = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=w.device))
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():  # Kaiming-uniform, as nn.Linear's default init (a = sqrt(5))
            bound = 1.0 / math.sqrt(in_features)
            self.alpha.copy_(torch.empty(blocks, in_features).uniform_(-bound, bound, generator=generator))

    def delta_weight(self) -> torch.Tensor:
        w = self.weight.to(self.alpha.dtype)
        return self.scale * self.alpha.repeat_interleave(self.rows, dim=0) * self.beta[:, None] * w

    def unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.alpha.requires_grad or self.beta.requires_grad):
            bias = getattr(self.base, "bias", None)
            return _SPPTrainingLinear.apply(x, self.weight, self.alpha, self.beta, bias, self.scale, self.rows)
        return self.blockwise_forward(x)

    def blockwise_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b`` plus, per row block k, ``(x ⊙ α_k) W_kᵀ``, scaled by β (no out x in temporary)."""
        w = self.weight
        xw, alpha, beta = x.to(w.dtype), self.alpha.to(w.dtype), self.beta.to(w.dtype)
        parts = [(xw * alpha[k]) @ w[k * self.rows:(k + 1) * self.rows].T for k in range(self.rank)]
        return self.base(x) + (self.scale * torch.cat(parts, dim=-1) * beta).to(x.dtype)

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W + scale·A⊙β⊙W)ᵀ + b`` with the full delta materialised (tests compare against it)."""
        out = self.base(x)
        return out if self.merged else out + (x.to(self.alpha.dtype) @ self.delta_weight().T).to(out.dtype)


class LoRALinear(AdapterLinear):
    """LoRA: ``W' = W + (alpha/r)·B A`` with A Kaiming-uniform and B zero. With
    ``keep_mask`` (LoRA*, the SPP paper's baseline) merging re-applies the base
    weight's zero pattern; without it the merge fills the zeros in."""

    def __init__(self, base: nn.Module, rank: int = 8, lora_alpha: float | None = None, keep_mask: bool = True,
                 seed: int | None = None):
        super().__init__(base)
        out_features, in_features = self.weight.shape
        w = self.weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # trained in float32 even on a bf16/fp16 base
        self.rank = rank
        self.scale = (lora_alpha if lora_alpha is not None else rank) / rank
        self.keep_mask = keep_mask
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=w.device))
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a.copy_(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_b @ self.lora_a

    def unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)  # the compute dtype of the base layer
        return self.base(x) + self.scale * ((x @ a.T) @ b.T)

    def merged_weight(self) -> torch.Tensor:
        merged = super().merged_weight()
        return merged * (self.weight != 0) if self.keep_mask else merged
