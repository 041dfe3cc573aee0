"""Resource measurements reported with every run."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux; None where /proc is missing)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


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
