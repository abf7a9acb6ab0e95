"""Atomic file output: nothing is half-written, existing outputs are never half-overwritten.

- :func:`atomic_write_bytes` / :func:`atomic_write_json`: temp file in the same directory, then
  ``os.replace`` (fsync first when ``TVQ_FSYNC=1``).
- :class:`SafetensorsStreamWriter`: writes a valid ``.safetensors`` file tensor by tensor, so a
  store's task file never needs all its tensors in memory. The header's size is reserved up front
  from the names and maximum sizes the caller announces and padded with spaces at the end (the
  format allows trailing spaces in the header).
- :func:`save_safetensors`: a whole state dict as one ``.safetensors`` file, through that writer.
- :func:`staged_directory`: build a directory under a temporary name and move it into place only
  when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import OutputExistsError


def _durable() -> bool:
    """fsync before every rename when ``TVQ_FSYNC=1``.

    Renaming a complete temp file is atomic for every crash of the process; fsync additionally
    survives power loss, at the cost of waiting for the disk (~0.1 s per 50 MB here), so it is
    opt-in.
    """
    return os.environ.get("TVQ_FSYNC", "") in ("1", "true", "yes")

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


_NUMPY_VIEWABLE = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                   torch.uint8, torch.bool}


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse to clobber ``path`` unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output path or pass --overwrite")


def _tmp_sibling(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new empty temp file next to ``path``: its open descriptor and its path.

    Write through this descriptor rather than reopening with ``"wb"``: truncating a file makes
    ext4 flush it to disk when it is closed (``auto_da_alloc``), which costs ~25 ms per 50 MB.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    return fd, Path(name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _tmp_sibling(path)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            if _durable():
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


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

    def __init__(self, path: Path, header_budget: int, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
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
        self.write_at(0, struct.pack("<Q", len(raw)) + raw)
        if _durable():
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._tmp, self.path)
        return 8 + len(raw) + self._offset

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


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as one ``.safetensors`` file (atomically: a temp file, then a rename)."""
    path = Path(path)
    specs = {k: ("F32", v.dim()) for k, v in sd.items()}
    with SafetensorsStreamWriter(path, header_upper_bound(specs, sum(v.numel() * 8 for v in sd.values()))) as w:
        for k, v in sd.items():
            w.add(k, v.contiguous())
        w.close()
    return path


@contextlib.contextmanager
def staged_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``final``; on success it replaces ``final``.

    On error the temp directory is removed and ``final`` is untouched. With ``overwrite`` an
    existing ``final`` is moved aside first and deleted only after the new one is in place.
    """
    final = Path(final)
    check_output(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".staging", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
