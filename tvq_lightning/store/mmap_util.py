"""Dropping the resident pages of a read-only memory map, without holding the GIL.

``mmap.madvise`` keeps the GIL for the whole call, and unmapping hundreds of MiB of pages takes
milliseconds of kernel time; through ``ctypes`` (which releases the GIL around foreign calls) the
release can run in a worker thread beside the quantizing threads. The map's pages are never
written, so dropping them is always safe: they fault in again from the page cache on access.
"""
from __future__ import annotations

import ctypes
import mmap

PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - not a POSIX libc
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _libc_madvise() if _DONTNEED is not None else None


class PageReleaser:
    """``release(start, end)`` drops the whole pages of ``mm`` inside bytes ``[start, end)``.

    Holds a buffer export of ``mm`` (for its address), so ``mm`` cannot be closed or resized
    while this object lives; the mapping is kept for the tensors viewing it anyway.
    """

    def __init__(self, mm: mmap.mmap):
        self.mm, self.size = mm, len(mm)
        self._anchor = None
        if _MADVISE is not None and not mm.closed:
            try:
                self._anchor = ctypes.c_char.from_buffer(mm)
            except (TypeError, ValueError, BufferError):  # pragma: no cover - read-only map
                self._anchor = None

    def release(self, start: int = 0, end: int | None = None) -> None:
        end = self.size if end is None else min(end, self.size)
        start = -(-max(start, 0) // PAGE) * PAGE  # pages shared with neighbours stay
        end = end if end == self.size else end // PAGE * PAGE
        if end <= start or _DONTNEED is None:
            return
        if self._anchor is not None:
            _MADVISE(ctypes.addressof(self._anchor) + start, end - start, _DONTNEED)
        elif hasattr(self.mm, "madvise"):  # pragma: no cover - without ctypes' madvise
            self.mm.madvise(_DONTNEED, start, end - start)
