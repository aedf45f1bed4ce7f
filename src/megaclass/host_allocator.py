"""The process's host allocator: large freed blocks kept for reuse instead of handed back to the system.

glibc's ``malloc`` serves a block above its mmap threshold (at most 32 MiB) with freshly mapped pages and
unmaps it when it is freed. A tensor of that size made anew every step then takes each of its pages with a
fault the kernel answers by zeroing the page: the dense gradient of an MLP's first layer over 85,804 n-grams x
1,024 (351 MB) on a CPU step, a parameter-server pull of 20,000 rows of D 512 (41 MB). On 2 CPU cores an epoch
of deb-tags' texts spent more time in the kernel than in torch (benchmarks/RESULTS.md).

:func:`reuse_freed_blocks` tells glibc to serve every block from its heap and to keep what is freed there:
the next step's tensor of the same size takes the same pages, already mapped. The resident set then stays at
its peak instead of falling between steps. ``MEGACLASS_HOST_MALLOC=system`` leaves the allocator as it is.

:func:`release_free_memory` hands the heap's free pages back to the system once, after work whose scratch is
not made again (a text file's featuriser fit, an index's cold build on the CPU): kept, the next allocations
too large for its free pieces would take fresh pages beside them.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["release_free_memory", "reuse_freed_blocks"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # the largest trim threshold mallopt's int takes: free space kept at the heap's top

_state = {"reusing": False}


def reuse_freed_blocks() -> bool:
    """Serve large blocks from glibc's heap and keep freed ones for reuse (see the module docstring); for
    the rest of the process. Returns whether the allocator now does so: False on a C library other than
    glibc, or with ``MEGACLASS_HOST_MALLOC=system``."""
    if _state["reusing"]:
        return True
    if os.environ.get("MEGACLASS_HOST_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # the trim threshold first: with mapping off, a large freed block at the heap's top is not given back
    _state["reusing"] = bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_MMAP_MAX, 0))
    return _state["reusing"]


def release_free_memory() -> None:
    """Hand the free pages of glibc's heap back to the system (``malloc_trim``); nothing on another C
    library. Blocks in use stay where they are."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
