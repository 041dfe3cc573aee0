"""One exception family. The CLI prints ``str(error)`` on one line and exits 2.

Every message names the fix, not only the fault.
"""


class SparseforgeError(Exception):
    """Base of every error sparseforge raises on purpose."""


class ConfigError(SparseforgeError, ValueError):
    """A setting is out of range or malformed (sparsity, N:M, method, seq_len...)."""


class PatternError(ConfigError):
    """A sparsity pattern is malformed or impossible for a layer."""


class DataError(SparseforgeError):
    """Text data is missing, empty, malformed or too short."""


class ModelError(SparseforgeError):
    """A model cannot be found, loaded or is of an unsupported architecture."""


class NotALanguageModel(ModelError):
    """The model has no causal language-model head (an encoder, or a saved classifier)."""


class NumericalError(SparseforgeError, ArithmeticError):
    """Non-finite statistics or a factorisation that failed even with more dampening."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an error from another library (they span many lines), for one-line messages."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]
