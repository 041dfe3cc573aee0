"""Resource measurements reported with every run."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Large activations come and go once per block; without this, glibc keeps the
    freed pages and the process's resident memory creeps up block after block.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
