"""Content fingerprints of state dicts.

A store records the fingerprint of the pre-trained weights it was built from, so that it is never
applied to other weights. It is computed whenever a store is built or used, over hundreds of MB,
so it must be cheap, yet change whenever a key, dtype, shape or any element changes.

Scheme (``"tvq1:<64 hex>"``): each tensor's raw bytes (C order, little-endian) get a CRC-32
(:func:`crc32`: zlib's, ~3 GB/s, or libdeflate's where the system has it, several times faster;
both release the GIL, so the store writer computes it in its worker threads alongside the
quantization of the same key); SHA-256 then hashes, for each key in sorted order,
the line ``[key, dtype, shape, nbytes, crc32]``. This is an integrity fingerprint against using
the wrong weights (a different pre-trained model differs in every tensor; any single changed
element changes its CRC), not a defence against an adversary crafting collisions.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import zlib
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["FINGERPRINT_ALGORITHM", "combine_entries", "crc32", "fingerprint_state_dict", "entry_with_crc", "short_fingerprint",
           "tensor_entry"]

FINGERPRINT_ALGORITHM = "tvq1"
_DOMAIN = b"tvq-state-dict-fingerprint-v1\n"
_CHUNK = 1 << 26


def _libdeflate_crc32():
    """libdeflate's ``crc32(crc, buffer, len)`` (carry-less multiply, the same values as zlib's), or None."""
    try:
        fn = ctypes.CDLL("libdeflate.so.0").libdeflate_crc32
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint32
    return fn


_LIBDEFLATE_CRC32 = _libdeflate_crc32()


def crc32(data, value: int = 0) -> int:
    """``zlib.crc32(data, value)`` of a bytes-like object, by libdeflate when the system has it."""
    if _LIBDEFLATE_CRC32 is None:
        return zlib.crc32(data, value)
    arr = np.frombuffer(data, np.uint8)
    return _LIBDEFLATE_CRC32(value, arr.ctypes.data, arr.size)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, as a memoryview (a copy only if not contiguous on CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def tensor_entry(t: torch.Tensor) -> tuple[str, list[int], int, int]:
    """``(dtype, shape, nbytes, crc32)`` of one tensor."""
    raw = _raw_bytes(t)
    crc = 0
    for start in range(0, raw.nbytes, _CHUNK):
        crc = crc32(raw[start:start + _CHUNK], crc)
    return entry_with_crc(t, crc)


def entry_with_crc(t: torch.Tensor, crc: int) -> tuple[str, list[int], int, int]:
    """The :func:`tensor_entry` of ``t`` given the CRC-32 of its bytes, computed elsewhere
    (:func:`crc32` over consecutive pieces, each continuing from the previous value)."""
    return str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size(), crc


def combine_entries(entries: Mapping[str, tuple[str, list[int], int, int]]) -> str:
    """The fingerprint from per-key :func:`tensor_entry` results (any order)."""
    h = hashlib.sha256(_DOMAIN)
    for key in sorted(entries):
        dtype, shape, nbytes, crc = entries[key]
        h.update(json.dumps([key, dtype, list(shape), nbytes, crc]).encode() + b"\n")
    return f"{FINGERPRINT_ALGORITHM}:{h.hexdigest()}"


def fingerprint_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """``"tvq1:<64 hex>"`` over the keys, dtypes, shapes and tensor bytes of ``sd``.

    The order of keys does not matter. Accepts any mapping, e.g. a
    :class:`~tvq_lightning.store.checkpoints.LazyStateDict` (tensors are read one at a time, and a
    memory-mapped tensor's pages are let go once hashed, so hashing a large file stays one tensor
    resident).
    """
    release = getattr(sd, "release", None)
    entries = {}
    for k in sd:
        entries[k] = tensor_entry(sd[k])
        if callable(release):
            release(k)
    return combine_entries(entries)


def short_fingerprint(fp: str) -> str:
    """Algorithm and the first 12 hex digits, e.g. ``"tvq1:3f2a9c0d41be"``, for messages."""
    algo, sep, digest = fp.partition(":")
    return f"{algo}:{digest[:12]}" if sep else fp[:12]
