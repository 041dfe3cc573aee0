"""Initialisation of models trained from scratch."""

from __future__ import annotations

import math

import torch
from torch import nn

from .families import get_adapter


def random_llama(config, seed: int, scaled_residual: bool = True) -> nn.Module:
    """A LlamaForCausalLM drawn from ``seed`` (transformers' init), its residual writers scaled
    (``scale_residual_writers``) unless ``scaled_residual`` is False: what ``sparseforge train --from-scratch`` and the
    benchmarks pre-train."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if scaled_residual:
        scale_residual_writers(model)
    return model


@torch.no_grad()
def scale_residual_writers(model: nn.Module) -> float:
    """Scale the linears that write into the residual stream (attention output, FFN down) by 1/sqrt(2 L), L blocks,
    as GPT-2 does: at a fixed init std the stream's variance otherwise grows with every block and buries the token
    embedding, which slows early training. Returns the factor."""
    adapter = get_adapter(model)
    factor = 1 / math.sqrt(2 * len(adapter.blocks))
    for block in adapter.blocks:
        for name in (adapter.attention().o, adapter.ffn.down):
            block.get_submodule(name).weight.mul_(factor)
    return factor
