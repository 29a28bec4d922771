"""glibc ``malloc`` settings for inference on the CPU.

At batch 4 the model's temporaries are blocks of 1–32 MB, allocated and freed many times per
forward. By default glibc serves blocks above its (adaptive) mmap threshold with fresh
``mmap`` calls and returns freed memory at the top of the heap to the kernel, so each forward
pays page faults to zero the same memory again. Keeping blocks up to 32 MB (the most glibc
allows) in the heap and never trimming it made the tiny model ~25 % faster per tile and
``segment`` ~12 % faster on the 2-core CPU (docs/performance.md, "Memory allocator"). Both
settings are needed: fixing only the trim threshold also switches off the adaptive mmap
threshold and made it 1.7× slower. Peak memory does not grow: freed blocks are reused.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 2**30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when they are in force.

    Does nothing off glibc (musl, macOS, Windows) or when the user set any ``MALLOC_*``
    threshold in the environment (theirs wins).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (and these mallopt codes)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied
