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
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import QuantConfigError, StoreError
from ..quant.config import GRANULARITIES, QuantSpec, check_bits
from ..quant.policy import list_policies
from ..quant.schemes import DEFAULT_SCHEME, Scheme, get_scheme, list_schemes

FORMAT = "tvq_lightning.store"
VERSION = 1
LAYOUT_FILE = "layout.json"


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
        return cls(tuple(d["shape"]), d["dtype"], bool(d["quantized"]), d.get("bits"), d.get("base_bits"),
                   d.get("offset_bits"))


@dataclass(frozen=True)
class TaskInfo:
    file: str
    source: str = ""
    nbytes: int = 0


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

    @property
    def fp32_checkpoint_bytes(self) -> int:
        """Bytes of one fp32 checkpoint of the floating keys this store covers."""
        return sum(k.numel * 4 for k in self.keys.values())

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.to_json(),
            "pretrained": {"fingerprint": self.fingerprint,
                           "num_params": sum(k.numel for k in self.keys.values()),
                           "fp32_bytes": self.fp32_checkpoint_bytes},
            "generation": self.generation,
            "keys": {k: v.to_json() for k, v in self.keys.items()},
            "tasks": {n: asdict(t) for n, t in self.tasks.items()},
            "base": None if self.base is None else {**asdict(self.base), "tasks": list(self.base_tasks)},
            "allocation": self.allocation,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "Layout":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{path} is not a tvq_lightning store layout (no format {FORMAT!r}); point to a directory made by `tvq quantize`")
        if data.get("version") != VERSION:
            raise StoreError(f"{path} has store format version {data.get('version')!r}, this tvq_lightning reads version {VERSION}; upgrade tvq_lightning or re-create the store")
        try:
            base = data.get("base")
            return cls(
                config=StoreConfig.from_json(data["config"]),
                fingerprint=data["pretrained"]["fingerprint"],
                keys={k: KeyInfo.from_json(v) for k, v in data["keys"].items()},
                tasks={n: TaskInfo(**t) for n, t in data["tasks"].items()},
                base=None if base is None else TaskInfo(base["file"], base.get("source", ""), base.get("nbytes", 0)),
                base_tasks=tuple(base.get("tasks", ())) if base else (),
                generation=int(data.get("generation", 1)),
                allocation=data.get("allocation"),
                extra=data.get("extra") or {},
            )
        except QuantConfigError as e:  # e.g. a scheme this installation does not register
            raise StoreError(f"{path}: {e}; register that scheme (register_scheme) before opening the store, "
                             f"or re-create the store") from None
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path} is damaged ({type(e).__name__}: {e}); re-create the store with `tvq quantize`") from None


def read_layout(store: Path) -> Layout:
    store = Path(store)
    path = store / LAYOUT_FILE
    if not store.exists():
        raise StoreError(f"{store}: no such store; check the path or create it with `tvq quantize`")
    if not path.is_file():
        raise StoreError(f"{store} is not a store (no {LAYOUT_FILE}); point to a directory made by `tvq quantize`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is unreadable or truncated ({e}); re-create the store with `tvq quantize`") from None
    return Layout.from_json(data, path)
