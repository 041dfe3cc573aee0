"""sparseforge: make transformer language models sparse, and measure what it costs and buys.

The public names are imported on first use, so ``sparseforge --help`` and the command line's
early checks answer without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Pattern": ".sparsity.pattern",
    "SparseforgeError": ".errors",
    "calibration_data": ".api",
    "evaluate": ".api",
    "load_model": ".loading",
    "prune": ".api",
    "read_metadata": ".export",
    "save": ".export",
    "sparsity_summary": ".eval.sparsity_report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparseforge' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
