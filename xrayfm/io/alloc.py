"""Opt-in allocator tuning for decode-heavy worker processes (glibc only).

Decoding a radiograph allocates several fresh multi-megabyte buffers (file bytes, decoded
frame, float32 image, resized copy). glibc serves blocks that large with ``mmap`` and hands freed
heap tops back to the kernel, so every image pays first-touch page faults on ~40 MB: measured
here that is 2-3x the actual decode work for an uncompressed 15-bit CR (see docs/io.md).
Keeping freed memory in the process removes that cost; the price is that the process keeps its
peak heap size. Call it once at the start of an ingest worker, not from library code.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit


def retain_freed_memory(trim_threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc malloc to serve blocks up to 32 MiB from the heap and keep up to
    ``trim_threshold_bytes`` of freed heap; return False where not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, min(trim_threshold_bytes, 2**31 - 1)) == 1
    return ok_mmap and ok_trim
