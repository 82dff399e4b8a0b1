"""The process's memory policy: freed tensors go back to the operating system.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
activations of that size come from the heap and stay resident once freed; each thread that allocates also
gets an arena of its own. A server that evaluates many plans for many sessions then holds far more memory
than its live tensors: measured on a DistilBERT-size model, 8 sessions x 2 updates grew the process by
1.24 GB with glibc's defaults and by 0.67 GB with a fixed 1 MB threshold and two arenas. Elsewhere (not
glibc) this does nothing.

The threshold is 4 MB, not 1 MB: every mapped block is faulted in afresh, page by page, and at 1 MB the
embedded model's batches (hidden 384) mapped nearly every activation. One update then took 4.3-4.5 s instead
of 3.1-3.9 s at 4 MB (one process, 2 threads). The wide blocks that hold memory (feed-forward activations,
a large model's states) are still mapped and given back.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt's parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20
ARENAS = 2


@functools.cache
def release_freed_memory() -> bool:
    """Blocks of 4 MB and more are mapped and unmapped on their own, in at most two arenas; True when set."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_ARENA_MAX, ARENAS))
