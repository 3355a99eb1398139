"""Process memory tuning for training loops over large activations (glibc's malloc).

A training step allocates and frees the same large activation arrays every time. glibc
serves arrays above its mmap threshold with fresh mmap()s, so each step page-faults every
activation in again (a third of a MiniLM step, docs/performance.md). Raising the threshold
keeps freed blocks in the heap for reuse. Models call `keep_freed_memory()` on their first
training-mode forward pass; the cost is that the process keeps its peak heap instead of
returning it to the OS. Opt out with LORA_KEEP_FREED_MEMORY=0. glibc only; a no-op elsewhere.
"""

from __future__ import annotations

import os

__all__ = ["keep_freed_memory"]

_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed large blocks instead of unmapping them (mallopt
    M_MMAP_THRESHOLD = 32 MiB, its maximum; M_TRIM_THRESHOLD = 4 GiB). Returns whether it
    was applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("LORA_KEEP_FREED_MEMORY", "1") == "0":
        return _MALLOC_TUNED
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1  # glibc caps the threshold at 32 MiB
    ok = mallopt(m_trim_threshold, (1 << 32) - 1) == 1 and ok
    return ok
