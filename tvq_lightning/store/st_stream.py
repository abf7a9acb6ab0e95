"""Streaming ``.safetensors`` output: a valid file written tensor by tensor, finalised atomically.

:class:`SafetensorsStreamWriter` lets a store's task file be written without all its tensors in
memory. The header's size is reserved up front from the names and maximum sizes the caller
announces (:func:`header_upper_bound`) and padded with spaces at the end (the format allows
trailing spaces in the header). :func:`save_safetensors` writes a whole state dict through it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .fingerprint import crc32
from .io import _durable, _tmp_sibling

__all__ = ["SafetensorsStreamWriter", "header_upper_bound", "save_safetensors", "tensor_bytes"]

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


_NUMPY_VIEWABLE = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                   torch.uint8, torch.bool}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order (a copy only if it is not a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in _NUMPY_VIEWABLE:  # numpy's view: a few microseconds less than torch's, per key
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


_GATHER_BYTES = 1 << 16  # tensors smaller than this are gathered before writing, up to this much
_CRC_CHUNK = 8 << 20


class SafetensorsStreamWriter:
    """Append tensors one by one to a ``.safetensors`` file, finalised atomically.

    Data goes to the file with ``os.pwrite`` at known offsets, so a large tensor can also be
    written piecewise and from several threads: :meth:`reserve` gives it its place in the file,
    :meth:`write_at` fills it (:meth:`add` is both at once). Only :meth:`reserve` / :meth:`add`
    must be called from one thread at a time. Small tensors added one after another are gathered
    and written together (a small ``pwrite`` costs about as much as a large one, and more while
    other threads write to the file).

    Args:
        path: final file path (written as a temp sibling, renamed on :meth:`close`).
        header_budget: an upper bound on the header's JSON length, see :func:`header_upper_bound`.
        metadata: string -> string ``__metadata__``.
    """

    def __init__(self, path: Path, header_budget: int, metadata: Mapping[str, str] | None = None,
                 checksums: bool = False):
        self.path = Path(path)
        #: filled by close(): CRC-32 of the header, then of each tensor in file order
        self.checksums: list[int] | None = [] if checksums else None
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta_len = len(json.dumps({"__metadata__": self.metadata}))
        self._reserved = ((header_budget + meta_len + 64) + 7) // 8 * 8
        self._fd, self._tmp = _tmp_sibling(self.path, ".part")
        self._data_start = 8 + self._reserved  # the header is written at close
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._pending, self._pending_at = bytearray(), 0  # small tensors' bytes not yet written, from offset

    def reserve(self, name: str, dtype: str, shape: list[int], nbytes: int) -> int:
        """Add tensor ``name`` (safetensors dtype tag, shape) of ``nbytes``; its file offset."""
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        return self._data_start + self._offset - nbytes

    def write_at(self, offset: int, data) -> None:
        """Write the bytes ``data`` (any buffer) at file ``offset``, e.g. one from :meth:`reserve`."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_bytes(name, _ST_DTYPES[tensor.dtype], list(tensor.shape), tensor_bytes(tensor))

    def add_bytes(self, name: str, dtype: str, shape: list[int], data) -> None:
        """:meth:`add` of a tensor given as its safetensors dtype tag, shape and bytes (any C-contiguous buffer)."""
        data = memoryview(data).cast("B")
        offset = self.reserve(name, dtype, shape, data.nbytes)
        if data.nbytes >= _GATHER_BYTES:
            self.write_at(offset, data)
            return
        if offset != self._pending_at + len(self._pending) or len(self._pending) >= _GATHER_BYTES:
            self._flush()
            self._pending_at = offset
        self._pending += data

    def _flush(self) -> None:
        if self._pending:
            self.write_at(self._pending_at, self._pending)
            self._pending = bytearray()

    def add_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """:meth:`add` each of ``tensors`` (name -> tensor), in order."""
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def close(self) -> int:
        """Write the header and rename into place (fsync first if durable); returns the file size."""
        self._flush()
        header = dict(self._entries)
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self._reserved:  # pragma: no cover - guarded by header_upper_bound
            self.abort()
            raise RuntimeError(f"safetensors header of {len(raw)} bytes exceeds the reserved {self._reserved}")
        raw += b" " * (self._reserved - len(raw))
        head = struct.pack("<Q", len(raw)) + raw
        self.write_at(0, head)
        if self.checksums is not None:
            self._checksum(head)
        if _durable():
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._tmp, self.path)
        return 8 + len(raw) + self._offset

    def _checksum(self, head: bytes) -> None:
        """CRC-32 of the header, then of every tensor's bytes as written, in file order (read back
        from the page cache: pieces written from several threads need no bookkeeping)."""
        self.checksums.append(crc32(head))
        end = self._data_start + self._offset
        buf = bytearray(min(max(end - self._data_start, 1), _CRC_CHUNK))
        view = memoryview(buf)
        for name, e in self._entries.items():
            pos, stop = (self._data_start + o for o in e["data_offsets"])
            crc = 0
            while pos < stop:
                n = os.preadv(self._fd, [view[: min(stop - pos, len(buf))]], pos)
                if n <= 0:
                    raise OSError(errno.EIO, "short read while checksumming", str(self._tmp))
                crc = crc32(view[:n], crc)
                pos += n
            self.checksums.append(crc)

    def abort(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def header_upper_bound(specs: Mapping[str, tuple[str, int]], total_bytes: int) -> int:
    """Upper bound of the JSON header for tensors ``name -> (dtype tag, ndim)``.

    Every offset is at most ``total_bytes`` and every dimension at most 20 digits.
    """
    off = len(str(max(total_bytes, 1)))
    per = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},')
    return 2 + sum(len(json.dumps(n)) + per + ndim * 21 + 2 * off for n, (_, ndim) in specs.items())


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict (and optional string ``metadata``) as one ``.safetensors`` file, atomically
    (a temp file, then a rename)."""
    path = Path(path)
    specs = {k: ("F32", v.dim()) for k, v in sd.items()}
    bound = header_upper_bound(specs, sum(v.numel() * 8 for v in sd.values()))
    with SafetensorsStreamWriter(path, bound, **({"metadata": metadata} if metadata else {})) as w:
        for k, v in sd.items():
            w.add(k, v.contiguous())
        w.close()
    return path
