"""Giving freed heap memory back to the system after a task is loaded or fitted.

Fitting a method allocates large temporaries beside the arrays it keeps (GDA's [d, d] scatter, APE's and
Tip-X's float64 class sums), and frees them. glibc keeps freed heap pages mapped, and the arrays allocated
after them land between the holes, so a process that restored 30 tasks of 100 classes x 16 shots (d = 1280)
held 2.70x their raw key + text bytes, of which the arrays themselves are ~1.6x (docs/benchmarks.md).
`malloc_trim(0)` returns every whole free page, in every arena, without changing how anything is
allocated, so the classify path's own allocations are untouched (a fixed `M_MMAP_THRESHOLD` would have
given large classify temporaries an mmap and a page-fault pass on every call). One trim costs ~10 ms on
a heap of a few hundred MB: it runs after a restore, a build or a method's first fit, never per request.
Elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; True if the C library could be asked (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
