"""Process-level settings the CLI applies at start (library users may call them too).

:func:`configure_allocator` pins glibc's mmap threshold at 1 MiB. glibc raises that threshold
dynamically whenever a large block is freed, after which tensors of a few MB come from the heap
arenas (one per worker thread) and stay resident after they are freed: a key-by-key streaming
pass then holds more memory the more tasks it decodes per key (measured on `tvq merge` TIES at
T = 16: 1000-1040 MiB peak instead of 924 MiB). A fixed threshold returns every large tensor's
memory to the OS when it is freed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3


def configure_allocator(mmap_threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (Linux/glibc only; a no-op elsewhere). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
