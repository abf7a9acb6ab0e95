"""Read model weights from checkpoint files, lazily and without copies where possible.

Formats understood by :func:`open_checkpoint` / :func:`load_state_dict`:

``.safetensors``
    Read by our own zero-copy reader. The header (an 8-byte little-endian length, then a JSON
    object mapping each tensor name to ``dtype``, ``shape`` and ``data_offsets`` relative to the
    end of the header) is parsed and validated, the file is ``mmap``-ed once copy-on-write, and
    each tensor is a ``torch.frombuffer`` view into that mapping, created on access. Writing to
    such a tensor changes a private copy of the page, never the file. A tensor keeps the
    mapping alive on its own, so tensors stay valid after :meth:`LazyStateDict.close`; but do
    not truncate or rewrite the file *in place* while they are alive (replacing it by a rename
    is fine). Tensors at offsets not aligned to their element size are copied (aligned).
``.pt`` / ``.pth`` / ``.bin`` (``torch.save`` output) and Lightning ``.ckpt``
    Read with ``torch.load(map_location="cpu", weights_only=True)``, memory-mapped for zip-format
    files. The state dict is the object itself when it maps names to tensors, or the one found
    under ``state_dict`` (Lightning), ``model_state_dict``, ``model`` or ``module``. Values that
    are not tensors (``_extra_state``, counters, hyper-parameters) are skipped. A file that holds
    pickled Python objects (e.g. a whole ``nn.Module``, as the task_vectors release ships) is
    refused unless ``allow_pickle=True``: then it is read by :mod:`.safe_pickle`'s restricted
    unpickler, which runs no code from the file (tensors are rebuilt, classes of an allow-list of
    namespaces become inert stand-ins, anything else is refused) and takes what the pickled
    module's ``state_dict()`` would hold. ``trust_pickle_code=True`` instead unpickles it with
    plain ``torch.load(weights_only=False)``, which runs code from the file and needs its classes
    importable: only for files you trust that the allow-list refuses.
other extensions
    Tried as safetensors (by parsing the header), then with ``torch.load``.

``prefix="model."`` keeps only the keys that start with ``model.`` and strips it (``None`` or
``""`` keeps every key). Every failure is a :class:`~tvq_lightning.errors.CheckpointError` with a
one-line message naming the file and what to do.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tvq_lightning.errors import CheckpointError
from tvq_lightning.store.mmap_util import PageReleaser
from tvq_lightning.store.safe_pickle import UnsafePickleError, is_module, module_state_dict, safe_load

__all__ = ["LazyStateDict", "common_prefixes", "load_state_dict", "open_checkpoint", "read_safetensors_header"]

SAFETENSORS_EXTENSIONS = (".safetensors",)
TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces

_ST_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}
#: safetensors dtype name -> torch dtype, for the dtypes this torch build has.
SAFETENSORS_DTYPES = {k: getattr(torch, v) for k, v in _ST_NAMES.items() if hasattr(torch, v)}
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")

Shape = tuple[int, ...]


class _PickleRefused(CheckpointError):
    """Internal: a valid torch file that pickles objects, so it needs ``allow_pickle=True``."""


_PICKLE_HINT = ("pass --allow-pickle (Python: allow_pickle=True): it loads pickled modules through an allow-list of "
                "classes and runs no code from the file; then convert it once with tvq convert")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, on one line, for embedding in ours."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = (lines[0] if lines else type(exc).__name__).split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file; pass the weights file inside it")
    if not p.exists():
        raise CheckpointError(f"{p}: no such file; check the path")
    return p


def _truncated(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or not a safetensors file: {detail}; re-export it")


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, OSError):
        return CheckpointError(f"{path}: cannot read ({exc.strerror or exc}); check the file permissions")
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}); re-export it")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns ``(entries, metadata, data_start)``: ``entries`` maps each tensor name to its
    ``{"dtype", "shape", "data_offsets"}`` record (in file order), ``metadata`` is the
    ``__metadata__`` string map (empty if absent), and ``data_start`` is the absolute byte offset
    that ``data_offsets`` are relative to. Raises :class:`CheckpointError` when the file is
    missing, truncated, garbled, or uses a dtype this torch build lacks.
    """
    p = _check_file(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _truncated(p, f"the file has {size} bytes, fewer than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise _truncated(p, f"header length {n} does not fit the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise _unreadable(p, e) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _truncated(p, f"header is not valid JSON ({_first_line(e)})") from e
    if not isinstance(header, dict):
        raise _truncated(p, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _truncated(p, "__metadata__ is not a map of strings to strings")
    data_start = 8 + n
    for key, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise _truncated(p, f"entry {key!r} lacks dtype, shape or data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{p}: tensor {key!r} has dtype {dtype!r}, which this reader does not support; "
                "convert it to F32, F16 or BF16"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _truncated(p, f"tensor {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_int, offs)) and 0 <= offs[0] <= offs[1]):
            raise _truncated(p, f"tensor {key!r} has invalid data_offsets {offs!r}")
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if offs[1] - offs[0] != need:
            raise _truncated(p, f"tensor {key!r} spans {offs[1] - offs[0]} bytes but {dtype}{shape} needs {need}")
        if data_start + offs[1] > size:
            raise _truncated(p, f"tensor {key!r} ends at byte {data_start + offs[1]} but the file has {size} bytes")
    entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
    return entries, metadata, data_start


class _SafetensorsSource:
    """Tensors as views into one copy-on-write memory map of a safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries, self.metadata, self.data_start = read_safetensors_header(path)
        with open(path, "rb") as f:  # the header check guarantees a non-empty file
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._pages = PageReleaser(self.mm)

    def meta(self, key: str) -> tuple[Shape, torch.dtype]:
        e = self.entries[key]
        return tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        shape, dtype = self.meta(key)
        begin, end = self.entries[key]["data_offsets"]
        if begin == end:  # frombuffer rejects count=0
            return torch.empty(shape, dtype=dtype)
        offset = self.data_start + begin
        if sys.byteorder != "little":  # the file is little-endian
            return self._copy(key)
        try:
            t = torch.frombuffer(self.mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset)
        except (RuntimeError, ValueError, TypeError):
            return self._copy(key)
        t = t.view(shape)
        return t.clone() if offset % dtype.itemsize else t

    def release(self, key: str | None = None) -> None:
        """Drop the resident pages of the mapping, or of ``key``'s data (:mod:`.mmap_util`); tensors
        stay valid (never written, their pages fault in again). Keeps streaming passes' RSS bounded."""
        if key is None:
            self._pages.release()
        else:
            begin, end = self.entries[key]["data_offsets"]
            self._pages.release(self.data_start + begin, self.data_start + end)

    def _copy(self, key: str) -> torch.Tensor:
        from safetensors import safe_open  # slow path only: big-endian hosts, odd buffers

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


class _DictSource:
    """Tensors already loaded (memory-mapped where torch can) from a torch checkpoint."""

    metadata: dict[str, str] = {}

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.entries = tensors

    def meta(self, key: str) -> tuple[Shape, torch.dtype]:
        t = self.entries[key]
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> torch.Tensor:
        return self.entries[key]


def _torch_load(path: Path, weights_only: bool) -> Any:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # only zip-format files can be memory-mapped
    with warnings.catch_warnings():  # torch's note on non-default pickle protocols is noise here
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=is_zip)


def _load_torch_object(path: Path, allow_pickle: bool, trust_pickle_code: bool = False) -> Any:
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise _unreadable(path, e) from e
        if not (allow_pickle or trust_pickle_code):
            if "Unsupported global" in msg:
                raise _PickleRefused(f"{path} holds pickled Python objects (e.g. a whole nn.Module); {_PICKLE_HINT}") from e
            raise CheckpointError(f"{path} is corrupt or holds pickled data that torch cannot load safely; re-export "
                                  f"it as .safetensors, or {_PICKLE_HINT}") from e
    except Exception as e:  # unreadable, truncated zip, garbage, ...
        raise _unreadable(path, e) from e
    if not trust_pickle_code:
        return safe_load(path)  # UnsafePickleError names the refused global
    try:
        return _torch_load(path, weights_only=False)
    except Exception as e:
        raise _unpickling_failed(path, e) from e


def _unpickling_failed(path: Path, exc: Exception) -> CheckpointError:
    """Why a pickled checkpoint did not load; code missing here (a module, a class) is named, with the fixes."""
    m = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(exc))
    missing = (f"module {exc.name!r}" if isinstance(exc, ModuleNotFoundError) and exc.name
               else f"class {m.group(2)}.{m.group(1)}" if isinstance(exc, AttributeError) and m else None)
    if missing is None:
        return CheckpointError(f"{path} could not be unpickled ({_first_line(exc)}); re-export it")
    return CheckpointError(
        f"{path} pickles objects whose {missing} cannot be imported here; install the package that provides it "
        "(or put its directory on PYTHONPATH), or convert the checkpoint to .safetensors where it loads "
        "(tvq convert IN OUT.safetensors --trust-pickle-code)")


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded object: a module, a name->tensor dict, or a nesting."""
    for _ in range(4):
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        elif is_module(obj):  # a stand-in of safe_pickle
            obj = module_state_dict(obj)
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _STATE_DICT_KEYS
                       if isinstance(obj.get(k), (Mapping, torch.nn.Module)) or is_module(obj.get(k))), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    tensors = {k: v.detach() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        top = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {top}); pass a state-dict checkpoint")
    return tensors


def common_prefixes(keys: Iterable[str], max_depth: int = 3) -> list[str]:
    """Dotted key prefixes (``"model."``, ``"model.encoder."``, ...) up to ``max_depth`` parts.

    Ordered shallowest first, then by how many keys share the prefix, then by name, so the
    first few are the best hints for choosing a ``prefix``.
    """
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for d in range(1, min(max_depth, len(parts) - 1) + 1):
            counts[".".join(parts[:d]) + "."] += 1
    return sorted(counts, key=lambda p: (p.count("."), -counts[p], p))


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Read-only mapping key -> tensor over a checkpoint file; tensors are read on access.

    Create it with :func:`open_checkpoint`. Keys are in file order (prefix stripped). For
    safetensors files the tensors are copy-on-write views into a memory map of the file; they
    stay valid after :meth:`close` (which only drops this object's reference). Use
    :meth:`meta` for shapes and dtypes without touching tensor data.
    """

    def __init__(self, path: Path, source: Any, key_map: dict[str, str], fmt: str) -> None:
        self.path = path
        self.format = fmt  #: ``"safetensors"`` or ``"torch"``
        #: safetensors ``__metadata__`` (empty for torch checkpoints)
        self.metadata: dict[str, str] = dict(source.metadata)
        self._source = source
        self._key_map = key_map  # visible key -> key in the file

    def _open_source(self) -> Any:
        if self._source is None:
            raise CheckpointError(f"{self.path} was closed; open it again with open_checkpoint()")
        return self._source

    def __getitem__(self, key: str) -> torch.Tensor:
        src = self._key_map[key]  # KeyError for unknown keys, as the Mapping protocol requires
        return self._open_source().get(src)

    def __contains__(self, key: object) -> bool:  # without reading the tensor
        return key in self._key_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_map)

    def __len__(self) -> int:
        return len(self._key_map)

    def meta(self, key: str) -> tuple[Shape, torch.dtype]:
        """``(shape, dtype)`` of ``key`` without reading its data."""
        return self._open_source().meta(self._key_map[key])

    def release(self, key: str | None = None) -> None:
        """Let go of resident pages of a memory-mapped file, or of ``key``'s (no-op for other formats)."""
        if self._source is not None and hasattr(self._source, "release"):
            self._source.release(None if key is None else self._key_map[key])

    @property
    def closed(self) -> bool:
        return self._source is None

    def close(self) -> None:
        """Drop the reference to the file; tensors already returned remain valid."""
        self._source = None

    def __enter__(self) -> LazyStateDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} tensors"
        return f"LazyStateDict({str(self.path)!r}, {self.format}, {state})"


def _select(path: Path, keys: Iterable[str], prefix: str | None) -> dict[str, str]:
    keys = list(keys)
    if not prefix:
        return {k: k for k in keys}
    selected = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and len(k) > len(prefix)}
    if selected:
        return selected
    found = common_prefixes(keys)[:5]
    hint = (
        "prefixes found: " + ", ".join(repr(p) for p in found)
        if found
        else f"its keys have no dotted prefix (e.g. {keys[0]!r})" if keys else "it has no tensors"
    )
    raise CheckpointError(
        f"{path}: no key starts with prefix {prefix!r}; {hint}; pass one of them, or an empty prefix for all keys"
    )


def open_checkpoint(
    path: str | os.PathLike, *, prefix: str | None = None, allow_pickle: bool = False, trust_pickle_code: bool = False
) -> LazyStateDict:
    """Open a checkpoint lazily: see the module docstring for the formats, ``prefix``, ``allow_pickle`` (pickled
    modules through an allow-list, no code run) and ``trust_pickle_code`` (runs code from the file). A
    directory is read as a Hugging Face model folder (:func:`~.model_dir.open_model_dir`)."""
    if Path(path).expanduser().is_dir():
        from .model_dir import open_model_dir  # lazy: model_dir builds on this module

        return open_model_dir(path, prefix=prefix, allow_pickle=allow_pickle, trust_pickle_code=trust_pickle_code)
    p = _check_file(path)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        source, fmt = _SafetensorsSource(p), "safetensors"
    elif suffix in TORCH_EXTENSIONS:
        source, fmt = _DictSource(_extract_state_dict(_load_torch_object(p, allow_pickle, trust_pickle_code), p)), "torch"
    else:
        try:
            source, fmt = _SafetensorsSource(p), "safetensors"
        except CheckpointError:
            try:
                obj = _load_torch_object(p, allow_pickle, trust_pickle_code)
            except (_PickleRefused, UnsafePickleError):
                raise
            except CheckpointError as e:
                supported = ", ".join(SAFETENSORS_EXTENSIONS + TORCH_EXTENSIONS)
                raise CheckpointError(
                    f"{p}: unrecognised checkpoint format (neither safetensors nor torch.save); "
                    f"supported extensions are {supported}"
                ) from e
            source, fmt = _DictSource(_extract_state_dict(obj, p)), "torch"
    return LazyStateDict(p, source, _select(p, source.entries, prefix), fmt)


def load_state_dict(
    path: str | os.PathLike, *, prefix: str | None = None, allow_pickle: bool = False, trust_pickle_code: bool = False
) -> dict[str, torch.Tensor]:
    """``dict(open_checkpoint(...))``: every tensor created at once (still zero-copy views)."""
    with open_checkpoint(path, prefix=prefix, allow_pickle=allow_pickle, trust_pickle_code=trust_pickle_code) as sd:
        return {k: sd[k] for k in sd}
