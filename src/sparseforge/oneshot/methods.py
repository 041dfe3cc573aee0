"""The one-shot methods the engine can run: what statistics each needs, how it prunes a group.

A method prunes one *group* of layers that read the same input (e.g. q, k, v),
so statistics are gathered once per group and solvers may stack the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..methods import ONE_SHOT, get_method_info
from ..sparsity.pattern import Pattern
from .magnitude import magnitude_prune
from .sparsegpt import sparsegpt_prune
from .stats import InputStats
from .wanda import wanda_prune

# (weights by layer name, statistics or None, patterns by layer name, solver options) -> weights
GroupPruner = Callable[[dict[str, torch.Tensor], "InputStats | None", dict[str, Pattern], dict], dict[str, torch.Tensor]]


def _magnitude(weights, stats, patterns, options):
    return {name: magnitude_prune(w, patterns[name], layer=name) for name, w in weights.items()}


def _wanda(weights, stats, patterns, options):
    norms = stats.sq_norms
    return {name: wanda_prune(w, norms, patterns[name], layer=name) for name, w in weights.items()}


def _sparsegpt(weights, stats, patterns, options):
    hessian = stats.hessian
    solver_options = {k: options[k] for k in ("block_size", "dampening") if k in options}
    names = list(weights)
    if len(set(patterns[n] for n in names)) == 1 and len(names) > 1:
        # one solve for the stacked group: same H, rows independent, per-layer counts kept
        stacked = torch.cat([weights[n] for n in names], dim=0)
        splits = [weights[n].shape[0] for n in names]
        pruned = sparsegpt_prune(
            stacked, hessian, patterns[names[0]], row_splits=splits, layer="+".join(names), **solver_options
        )
        return dict(zip(names, torch.split(pruned, splits, dim=0)))
    return {n: sparsegpt_prune(weights[n], hessian, patterns[n], layer=n, **solver_options) for n in names}


@dataclass(frozen=True)
class OneShotMethod:
    """How the engine runs one method of the method index (sparseforge.methods)."""

    name: str
    #: statistics of the layer input the method needs: None, "sq_norms" or "hessian"
    stats_kind: str | None
    prune_group: GroupPruner
    #: prunes a whole FFN jointly from its inputs (SparseLLM); other layers use prune_group
    joint_ffn: bool = False
    #: how much of the FFN intermediate the one pass keeps for the block's output, the rest recomputed
    #: (chunked.KEEP_WIDE). The Hessian methods hold a Hessian and its factors beside it, so they keep at
    #: most the residual stream's size: their peak stays below llm-compressor's at ~15% more time
    #: (SparseGPT 50% on SmolLM2). Wanda's whole cost is the forward, where recomputing would add a
    #: quarter, so it keeps all. ``low_memory`` overrides this with "none".
    keep_wide: str = "all"


METHODS: dict[str, OneShotMethod] = {
    m.name: m
    for m in (
        OneShotMethod("magnitude", None, _magnitude),
        OneShotMethod("wanda", "sq_norms", _wanda),
        OneShotMethod("sparsegpt", "hessian", _sparsegpt, keep_wide="stream"),
        OneShotMethod("sparsellm", "hessian", _sparsegpt, joint_ffn=True, keep_wide="stream"),
    )
}


def get_method(name: str) -> OneShotMethod:
    get_method_info(name, ONE_SHOT)  # an unknown name fails with the index's choices
    return METHODS[name]
