"""The store's on-disk layout: a versioned JSON file next to safetensors files.

A store is a directory::

    STORE/
      layout.json                 this file's schema (FORMAT, VERSION below)
      base.g<N>.safetensors       RTVQ only: the quantized shared base
      tasks/<task>.g<N>.safetensors   one file per task

``layout.json`` records the scheme and its settings, per key the shape, dtype and bits (so a
bit allocation can give each key its own width), the tasks and their files, and the fingerprint
of the pre-trained weights the store belongs to. Inside a task file, a quantized key ``k`` is
stored as ``k#q`` (packed codes, uint8), ``k#z`` (int32 zero-points) and ``k#s`` (float32
scales); a full-precision key as ``k`` (float32 task vector); a key whose task vector is exactly
zero for that task is not stored at all. ``N`` is a generation counter: rewriting a file writes
a new generation and switches to it by atomically replacing ``layout.json``.

Version 2 adds integrity data: per file (task and base) ``crc32``, a string of 8-digit hex
CRC-32s separated by spaces: the file's header (8-byte length + JSON) first, then every stored
tensor's bytes in file order (ascending data offset); and ``layout_crc32``, the CRC-32 of the
layout's own canonical JSON (every other field, sorted keys, no spaces), so a damaged
``layout.json`` is refused too. The data files are the same as version 1's. Version 1 stores are
still read, unverified (``tvq_lightning.store.verify.upgrade_store`` adds the checksums).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import QuantConfigError, StoreError
from ..quant.config import GRANULARITIES, QuantSpec, check_bits
from ..quant.policy import list_policies
from ..quant.schemes import DEFAULT_SCHEME, Scheme, get_scheme, list_schemes
from .fingerprint import crc32

FORMAT = "tvq_lightning.store"
VERSION = 2
#: layout versions this code reads (1: no checksums)
READABLE_VERSIONS = (1, 2)
LAYOUT_FILE = "layout.json"
LAYOUT_CRC = "layout_crc32"
_FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
_FILE_NAME = re.compile(r"^(?:tasks/)?[A-Za-z0-9][A-Za-z0-9_.+-]*\.safetensors$")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_MAX_DIMS = 16
_CRCS = re.compile(r"^[0-9a-f]{8}( [0-9a-f]{8})*$")


def __getattr__(name: str):
    if name == "SCHEMES":  # the registered scheme names (kept for older callers)
        return tuple(list_schemes())
    raise AttributeError(name)


@dataclass(frozen=True)
class StoreConfig:
    """How task vectors are stored.

    Attributes:
        scheme: a registered scheme's name (``tvq_lightning.quant.list_schemes()``): the built-ins
            are ``fp32`` (exact task vectors), ``fq`` (quantized fine-tuned weights), ``tvq``
            (quantized task vectors), ``rtvq`` (quantized shared base + per-task offsets) and
            ``bitdelta`` (1-bit signs and a scale); the scheme object validates the rest.
        bits: code width for fq / tvq.
        base_bits, offset_bits: RTVQ's widths (paper default B3O2).
        granularity, group_size, symmetric: see :class:`~tvq_lightning.quant.config.QuantSpec`.
        error_correction: RTVQ offsets against the quantized base (default) or the fp32 mean.
        policy: which tensors are quantized (``tvq_lightning.quant.policy``).
        budget: bits per quantized parameter per task; bits are then chosen by the allocator.
        per_tensor_bits: with a budget, allow a different width per tensor.
    """

    scheme: str = DEFAULT_SCHEME
    bits: int = 4
    base_bits: int = 3
    offset_bits: int = 2
    granularity: str = "tensor"
    group_size: int = 128
    symmetric: bool = False
    error_correction: bool = True
    policy: str = "rank"
    budget: float | None = None
    per_tensor_bits: bool = False

    def __post_init__(self) -> None:
        impl = get_scheme(self.scheme)  # unknown names: an error naming the choices
        check_bits(self.bits, "bits")
        check_bits(self.base_bits, "base bits")
        check_bits(self.offset_bits, "offset bits")
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(f"granularity {self.granularity!r} is unknown: choose one of {', '.join(GRANULARITIES)}")
        if self.policy not in list_policies():
            raise QuantConfigError(f"policy {self.policy!r} is unknown: choose one of {', '.join(list_policies())}")
        impl.validate(self)

    @property
    def scheme_impl(self) -> Scheme:
        """The registered :class:`~tvq_lightning.quant.schemes.Scheme` object of ``scheme``."""
        return get_scheme(self.scheme)

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.granularity, self.group_size, self.symmetric)

    @property
    def label(self) -> str:
        """Short name as in the paper's tables (FP32, FQ-INT4, TVQ-INT3, RTVQ-B3O2), from the scheme."""
        return self.scheme_impl.label(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StoreConfig":
        return cls(**data)


@dataclass(frozen=True)
class KeyInfo:
    """One state-dict key: shape, dtype of the pre-trained tensor, and how it is stored."""

    shape: tuple[int, ...]
    dtype: str
    quantized: bool
    bits: int | None = None          # the scheme's key_fields: bits (fq / tvq / bitdelta),
    base_bits: int | None = None     # base_bits and offset_bits (rtvq)
    offset_bits: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype, "quantized": self.quantized}
        for k in ("bits", "base_bits", "offset_bits"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "KeyInfo":
        shape = d["shape"]
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(x) and x >= 0 for x in shape):
            raise ValueError(f"shape {shape!r} is not a list of at most {_MAX_DIMS} non-negative integers")
        if d["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(f"dtype {d['dtype']!r} is not a floating dtype")
        if not isinstance(d["quantized"], bool):
            raise ValueError(f"quantized {d['quantized']!r} is not a boolean")
        widths = [d.get(k) for k in ("bits", "base_bits", "offset_bits")]
        if any(w is not None and not (_is_int(w) and 1 <= w <= 64) for w in widths):
            raise ValueError(f"bits {widths} are not widths in 1..64")
        return cls(tuple(shape), d["dtype"], d["quantized"], *widths)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TaskInfo:
    file: str
    source: str = ""
    nbytes: int = 0
    #: CRC-32 of the header, then of each stored tensor in file order; None: not recorded (version 1)
    crc32: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "source": self.source, "nbytes": self.nbytes}
        if self.crc32 is not None:
            d["crc32"] = " ".join(f"{c:08x}" for c in self.crc32)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TaskInfo":
        file, source, nbytes, crcs = d["file"], d.get("source", ""), d.get("nbytes", 0), d.get("crc32")
        if not isinstance(file, str) or not _FILE_NAME.match(file) or ".." in file.split("/"):
            raise ValueError(f"file {file!r} is not a task file name inside the store")
        if not isinstance(source, str) or not _is_int(nbytes) or nbytes < 0:
            raise ValueError(f"source {source!r} / nbytes {nbytes!r} of {file!r} are not a string / a size")
        if crcs is not None:
            if not isinstance(crcs, str) or not _CRCS.match(crcs):
                raise ValueError(f"crc32 of {file!r} is not a list of 8-digit hex checksums")
            crcs = tuple(int(c, 16) for c in crcs.split())
        return cls(file, source, nbytes, crcs)


@dataclass(frozen=True)
class Layout:
    """The parsed ``layout.json``."""

    config: StoreConfig
    fingerprint: str
    keys: dict[str, KeyInfo]
    tasks: dict[str, TaskInfo]
    base: TaskInfo | None = None
    base_tasks: tuple[str, ...] = ()
    generation: int = 1
    allocation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the version read from disk (a new layout: :data:`VERSION`); version 1 has no checksums
    version: int = field(default=VERSION, compare=False)

    @property
    def fp32_checkpoint_bytes(self) -> int:
        """Bytes of one fp32 checkpoint of the floating keys this store covers."""
        return sum(k.numel * 4 for k in self.keys.values())

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``layout.json`` (version 2, sealed by :data:`LAYOUT_CRC`)."""
        data = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.to_json(),
            "pretrained": {"fingerprint": self.fingerprint,
                           "num_params": sum(k.numel for k in self.keys.values()),
                           "fp32_bytes": self.fp32_checkpoint_bytes},
            "generation": self.generation,
            "keys": {k: v.to_json() for k, v in self.keys.items()},
            "tasks": {n: t.to_json() for n, t in self.tasks.items()},
            "base": None if self.base is None else {**self.base.to_json(), "tasks": list(self.base_tasks)},
            "allocation": self.allocation,
            "extra": self.extra,
        }
        data[LAYOUT_CRC] = layout_checksum(data)
        return data

    @property
    def verifiable(self) -> bool:
        """Whether every file records its tensors' checksums."""
        return all(t.crc32 is not None for t in self.files().values())

    def files(self) -> dict[str, TaskInfo]:
        """Every data file: task name (``"<base>"`` for the shared file) -> its record."""
        out = dict(self.tasks)
        if self.base is not None:
            out["<base>"] = self.base
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "Layout":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{path} is not a tvq_lightning store layout (no format {FORMAT!r}); point to a directory made by `tvq quantize`")
        version = data.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise StoreError(f"{path} has store format version {version!r}, this tvq_lightning reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade tvq_lightning or re-create the store")
        if version >= 2:
            recorded = data.get(LAYOUT_CRC)
            if recorded != layout_checksum(data):
                raise StoreError(f"{path} is damaged or was edited (its checksum {LAYOUT_CRC} does not match its "
                                 f"content); re-create the store with `tvq quantize`")
        try:
            return cls._parse(data, version)
        except QuantConfigError as e:  # e.g. a scheme this installation does not register
            cfg = data.get("config")
            if isinstance(cfg, dict) and isinstance(cfg.get("scheme"), str) and cfg["scheme"] not in list_schemes():
                raise StoreError(f"{path}: {e}; register that scheme (register_scheme) before opening the store, "
                                 f"or re-create the store") from None
            raise StoreError(f"{path} is damaged (settings: {_short(e)}); re-create the store with `tvq quantize`") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            raise StoreError(f"{path} is damaged ({type(e).__name__}: {_short(e)}); re-create the store with "
                             f"`tvq quantize`") from None

    @classmethod
    def _parse(cls, data: dict[str, Any], version: int) -> "Layout":
        base = data.get("base")
        fingerprint = data["pretrained"]["fingerprint"]
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint {fingerprint!r} is not a string")
        keys = {k: KeyInfo.from_json(v) for k, v in data["keys"].items()}
        if any(not isinstance(k, str) or not k for k in keys):
            raise ValueError("an empty key name")
        tasks = {n: TaskInfo.from_json(t) for n, t in data["tasks"].items()}
        bad = [n for n in tasks if not _TASK_NAME.match(n)]
        if bad:
            raise ValueError(f"task name {bad[0]!r} is not a usable file name")
        base_info = None if base is None else TaskInfo.from_json(base)
        base_tasks = tuple(base.get("tasks", ())) if base else ()
        if not all(isinstance(t, str) for t in base_tasks):
            raise TypeError(f"base tasks {base_tasks!r} are not names")
        extra, allocation = data.get("extra") or {}, data.get("allocation")
        if not isinstance(extra, dict) or not (allocation is None or isinstance(allocation, dict)):
            raise TypeError("extra / allocation are not JSON objects")
        generation = data.get("generation", 1)
        if not _is_int(generation) or generation < 1:
            raise ValueError(f"generation {generation!r} is not a positive integer")
        files = [t.file for t in tasks.values()] + ([base_info.file] if base_info else [])
        if len(set(files)) != len(files):
            raise ValueError("two tasks name the same file")
        if any(math.prod(k.shape) > 1 << 48 for k in keys.values()):
            raise ValueError("a shape with more than 2^48 elements")
        return cls(StoreConfig.from_json(data["config"]), fingerprint, keys, tasks, base_info, base_tasks, generation,
                   allocation, extra, version)


def layout_checksum(data: dict[str, Any]) -> int:
    """CRC-32 of ``data``'s canonical JSON without :data:`LAYOUT_CRC` (sorted keys, no spaces)."""
    body = {k: v for k, v in data.items() if k != LAYOUT_CRC}
    try:
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError, RecursionError):
        return -1
    return crc32(raw)


def _short(e: BaseException, limit: int = 120) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_layout(store: Path) -> Layout:
    store = Path(store)
    path = store / LAYOUT_FILE
    if not store.exists():
        raise StoreError(f"{store}: no such store; check the path or create it with `tvq quantize`")
    if not path.is_file():
        raise StoreError(f"{store} is not a store (no {LAYOUT_FILE}); point to a directory made by `tvq quantize`")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise StoreError(f"{path} is unreadable or truncated ({type(e).__name__}: {_short(e)}); re-create the store "
                         f"with `tvq quantize`") from None
    return Layout.from_json(data, path)


def is_store(path: Path) -> bool:
    """Whether ``path`` is a directory whose ``layout.json`` has the store format (for safe overwrite)."""
    try:
        data = json.loads((Path(path) / LAYOUT_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT
