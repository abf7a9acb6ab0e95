"""Process-level settings the CLI applies at start (library users may call them too).

:func:`configure_allocator` pins glibc's mmap threshold at 1 MiB. glibc raises that threshold
dynamically whenever a large block is freed, after which tensors of a few MB come from the heap
arenas (one per worker thread) and stay resident after they are freed: a key-by-key streaming
pass then holds more memory the more tasks it decodes per key (measured on `tvq merge` TIES at
T = 16: 1000-1040 MiB peak instead of 924 MiB). A fixed threshold returns every large tensor's
memory to the OS when it is freed.

The price is paid by code that allocates and frees many mid-sized tensors per step, such as
training a convolutional network: each such tensor becomes an ``mmap`` / ``munmap`` pair with its
page faults (measured on the dense demo's fine-tuning, ``tu-resnet10t`` at 48×48, batch 32: 0.33 s
per step instead of 0.17 s). So the CLI applies it to the streaming commands and to ``tvq fit /
validate / test / predict`` (whose adaptation modules stream the task vectors), not to ``tvq demo``.
``TVQ_MMAP_THRESHOLD`` overrides it: a size in bytes, or ``off`` to leave glibc's dynamic
threshold alone (the test suite sets ``off``: most of its work is training tiny models).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
import sys

_M_MMAP_THRESHOLD = -3


def configure_allocator(mmap_threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold (Linux/glibc only; a no-op elsewhere). Returns whether it applied.

    ``mmap_threshold``: bytes; None: ``TVQ_MMAP_THRESHOLD`` from the environment (bytes, or
    ``off`` / ``0`` for no change), else 1 MiB.
    """
    if mmap_threshold is None:
        env = os.environ.get("TVQ_MMAP_THRESHOLD", "").strip().lower()
        if env in ("off", "0", "no", "false"):
            return False
        mmap_threshold = int(env) if env.isdigit() else 1 << 20
    if not sys.platform.startswith("linux") or mmap_threshold <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


def cache_root() -> Path:
    """Where generated data and split files are cached: ``$TVQ_CACHE_DIR``, default ``~/.cache/tvq_lightning``."""
    return Path(os.environ.get("TVQ_CACHE_DIR") or Path.home() / ".cache" / "tvq_lightning")
