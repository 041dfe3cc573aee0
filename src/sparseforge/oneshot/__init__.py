"""One-shot (post-training) pruning: the sequential engine and its solvers."""

from .engine import OneShotConfig, OneShotReport, prune_model
from .magnitude import magnitude_prune
from .methods import METHODS, get_method
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune

__all__ = [
    "METHODS",
    "OneShotConfig",
    "OneShotReport",
    "get_method",
    "magnitude_prune",
    "prune_model",
    "sparsegpt_prune",
    "wanda_prune",
]
