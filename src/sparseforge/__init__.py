"""sparseforge: make transformer language models sparse, and measure what it costs and buys."""

from .api import calibration_data, evaluate, prune
from .errors import SparseforgeError
from .eval.sparsity_report import sparsity_summary
from .export import read_metadata, save
from .loading import load_model
from .sparsity.pattern import Pattern

__version__ = "0.1.0"

__all__ = [
    "Pattern",
    "SparseforgeError",
    "calibration_data",
    "evaluate",
    "load_model",
    "prune",
    "read_metadata",
    "save",
    "sparsity_summary",
]
