"""fingerprint.crc32 (libdeflate's where the system has it) gives zlib.crc32's values."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from tvq_lightning.store import fingerprint


@pytest.mark.parametrize("fast", [True, False])
def test_crc32_equals_zlib(fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(fingerprint, "_LIBDEFLATE_CRC32", None)
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    view = memoryview(data)
    for n in (0, 1, 15, 16, 255, 4099, 1 << 20):
        assert fingerprint.crc32(view[:n]) == zlib.crc32(view[:n]), n
        # continued over consecutive pieces, as the store writer takes it
        assert fingerprint.crc32(view[n // 3:n], fingerprint.crc32(view[:n // 3])) == zlib.crc32(view[:n]), n
    assert fingerprint.crc32(b"tvq") == zlib.crc32(b"tvq")
    assert fingerprint.crc32(bytearray(b"tvq"), 7) == zlib.crc32(b"tvq", 7)
