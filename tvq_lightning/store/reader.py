"""Lazy reading of a store: one task's one key is dequantized without reading the rest.

Task files are opened with the zero-copy safetensors reader, so asking for a key maps only that
key's packed codes from disk.

Integrity (layout version 2): when a file is opened its header's CRC-32 and its set of tensors
are checked against ``layout.json``; each stored tensor's CRC-32 is checked the first time it is
read (``verify=False`` skips both, for trusted stores). A mismatch is an
:class:`~tvq_lightning.errors.IntegrityError` naming the file, the tensor and the fix.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, FingerprintMismatch, IntegrityError, StoreError
from ..quant.kernels import parallel_map
from ..quant.qtensor import QTensor
from .checkpoints import LazyStateDict, open_checkpoint
from .fingerprint import crc32, fingerprint_state_dict, short_fingerprint
from .layout import LAYOUT_FILE, KeyInfo, Layout, TaskInfo, read_layout

_DECODE_ERRORS = (KeyError, ValueError, RuntimeError, IndexError, TypeError, OverflowError)


class TaskVectorStore:
    """A read-only view of a store directory.

    Example::

        store = TaskVectorStore("runs/vitb32-tvq4")
        store.check_pretrained(theta0)                  # fingerprint must match
        tau = store.task_vector("cars", "conv1.weight")  # float32, only that key is read
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.layout: Layout = read_layout(self.path)
        self.verify = verify
        self._files: dict[str, LazyStateDict] = {}
        self._verified: set[tuple[str, str]] = set()
        self._by_file = {t.file: t for t in self.layout.files().values()}
        self._crcs: dict[str, dict[str, int]] = {}  # file -> stored tensor name -> CRC-32 (verified stores)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def config(self):
        return self.layout.config

    @property
    def scheme(self) -> str:
        return self.layout.config.scheme

    @property
    def tasks(self) -> list[str]:
        return list(self.layout.tasks)

    @property
    def keys(self) -> list[str]:
        return list(self.layout.keys)

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint

    @property
    def scheme_impl(self):
        """The store's :class:`~tvq_lightning.quant.schemes.Scheme` object (it decodes every key)."""
        return self.layout.config.scheme_impl

    @property
    def needs_pretrained(self) -> bool:
        """Stores of fine-tuned weights (FQ): their task vectors need theta_0."""
        return self.scheme_impl.needs_pretrained

    def files(self) -> list[Path]:
        rel = [t.file for t in self.layout.tasks.values()]
        if self.layout.base is not None:
            rel.append(self.layout.base.file)
        return [self.path / LAYOUT_FILE] + [self.path / r for r in rel]

    def missing_files(self) -> list[Path]:
        """Data files the layout names that are not on disk (an incomplete store)."""
        return [p for p in self.files()[1:] if not p.is_file()]

    def nbytes(self) -> int:
        """Bytes on disk of everything the store consists of."""
        return sum(p.stat().st_size for p in self.files() if p.exists())

    def check_pretrained(self, pretrained: Mapping[str, Tensor] | str, label: str = "the pre-trained weights") -> None:
        """Raise :class:`FingerprintMismatch` unless ``pretrained`` is what the store was built from."""
        fp = pretrained if isinstance(pretrained, str) else fingerprint_state_dict(pretrained)
        if fp != self.fingerprint:
            raise FingerprintMismatch(
                f"{label} (fingerprint {short_fingerprint(fp)}) are not the weights store {self.path} was built from "
                f"({short_fingerprint(self.fingerprint)}); pass the pre-trained checkpoint used with `tvq quantize`")

    def check_layout(self, pretrained) -> None:
        """The layout's keys, shapes and dtypes must be theta_0's floating tensors exactly (a
        :class:`~.sources.Source` or a mapping; call after :meth:`check_pretrained`). Checked from
        the metadata alone, before anything is allocated: no layout can make a reader allocate
        more than theta_0's shapes allow."""
        meta = pretrained.meta if hasattr(pretrained, "meta") else (lambda k: (tuple(pretrained[k].shape), pretrained[k].dtype))
        sd = pretrained.sd if hasattr(pretrained, "sd") else pretrained
        fix = "the store is damaged: re-create it with `tvq quantize` (or restore layout.json)"
        for k in sd.keys():
            shape, dtype = meta(k)
            info = self.layout.keys.get(k)
            if info is None:
                if dtype.is_floating_point:
                    raise StoreError(f"store {self.path}: layout.json has no entry for theta_0's key {k!r}; {fix}")
                continue
            if tuple(info.shape) != tuple(shape) or info.dtype != str(dtype).removeprefix("torch."):
                raise StoreError(f"store {self.path}: layout.json records key {k!r} as {info.dtype}{list(info.shape)}, "
                                 f"theta_0 has {str(dtype).removeprefix('torch.')}{list(shape)}; {fix}")
        extra = [k for k in self.layout.keys if k not in sd]
        if extra:
            raise StoreError(f"store {self.path}: layout.json has key {extra[0]!r}, which theta_0 lacks; pass the same "
                             f"--prefix as for `tvq quantize`, or {fix}")

    # -- files ------------------------------------------------------------------------------
    def _open(self, rel: str) -> LazyStateDict:
        f = self._files.get(rel)
        if f is None:
            path = self.path / rel
            if not path.is_file():
                raise StoreError(f"store {self.path} is missing {rel}; the store is incomplete, re-create it with `tvq quantize`")
            try:
                f = open_checkpoint(path)
            except CheckpointError as e:
                raise StoreError(f"store {self.path}: {e}") from None
            except _DECODE_ERRORS as e:  # a header the checkpoint reader does not expect
                raise StoreError(f"store {self.path}: {rel} has a damaged header ({type(e).__name__}); restore it or "
                                 f"re-create the store") from None
            info = self._file_info(rel)
            if self.verify and info is not None and info.crc32 is not None:
                self._crcs[rel] = self._check_header(path, f, info.crc32)
            self._files[rel] = f
        return f

    def _file_info(self, rel: str) -> TaskInfo | None:
        return self._by_file.get(rel)

    def _check_header(self, path: Path, f: LazyStateDict, crcs: tuple[int, ...]) -> dict[str, int]:
        """The header's CRC-32 against the layout's record; the tensors' recorded CRC-32 by name."""
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
                head += fh.read(int.from_bytes(head, "little"))
        except OSError as e:
            raise StoreError(f"store {self.path}: cannot read {path.name} ({e.strerror or e}); check its permissions") from None
        names = list(f.keys())  # in file order, as recorded
        if crc32(head) != crcs[0]:
            raise self._corrupt(path.name, "its header")
        if len(names) != len(crcs) - 1:
            raise self._corrupt(path.name, "its list of tensors")
        return dict(zip(names, crcs[1:]))

    def _corrupt(self, file: str, what: str) -> IntegrityError:
        return IntegrityError(f"store {self.path}: {what} in {file} does not match its checksum (the file is corrupt "
                              f"or was replaced); restore it or re-create the store with `tvq quantize`")

    def read(self, rel: str, name: str) -> Tensor:
        """Stored tensor ``name`` of file ``rel``, its checksum verified on first read."""
        f = self._open(rel)
        t = f[name]
        if self.verify and (rel, name) not in self._verified:
            crcs = self._crcs.get(rel)
            if crcs is not None:
                raw = t.contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else b""
                if crc32(raw) != crcs.get(name):
                    raise self._corrupt(Path(rel).name, f"tensor {name!r}")
            self._verified.add((rel, name))
        return t

    def _task_file(self, task: str) -> LazyStateDict:
        info = self.layout.tasks.get(task)
        if info is None:
            raise StoreError(f"store {self.path} has no task {task!r}; it has: {', '.join(self.tasks) or '(none)'}")
        return self._open(info.file)

    def _info(self, key: str) -> KeyInfo:
        info = self.layout.keys.get(key)
        if info is None:
            raise StoreError(f"store {self.path} has no key {key!r}")
        return info

    def _damaged(self, key: str, file: str, e: Exception) -> StoreError:
        detail = " ".join(str(e).split())[:160]
        return StoreError(f"store {self.path}: key {key!r} in {Path(file).name} is damaged ({type(e).__name__}: {detail}); "
                          f"re-create the store")

    # -- stored tensors ---------------------------------------------------------------------
    def parts(self, task: str, key: str) -> _Parts:
        """What ``task`` stores for ``key``: a mapping from suffix (``""``, ``"#q"``, ...) to tensor."""
        self._info(key)
        self._task_file(task)
        return _Parts(self, self.layout.tasks[task].file, key)

    def shared_parts(self, key: str) -> _Parts | None:
        """What the shared file (RTVQ's base) stores for ``key``; None without a shared file."""
        self._info(key)
        return None if self.layout.base is None else _Parts(self, self.layout.base.file, key)

    def qtensor(self, task: str, key: str) -> QTensor | None:
        """The affine codes of ``task``'s key (RTVQ: its offset); None if zero, not quantized or
        not affine codes (see :meth:`parts`)."""
        info = self._info(key)
        if not info.quantized:
            return None
        try:
            return self.scheme_impl.qtensor(self.config, info, self.parts(task, key))
        except _DECODE_ERRORS as e:
            raise self._damaged(key, self.layout.tasks[task].file, e) from None

    def base_qtensor(self, key: str) -> QTensor | None:
        """The shared file's affine codes for ``key`` (RTVQ's base; None for other schemes or zero keys)."""
        info = self._info(key)
        if self.layout.base is None or not info.quantized:
            return None
        try:
            return self.scheme_impl.qtensor(self.config, info, self.shared_parts(key), info.base_bits)
        except _DECODE_ERRORS as e:
            raise self._damaged(key, self.layout.base.file, e) from None

    # -- task vectors -----------------------------------------------------------------------

    def task_vector(self, task: str, key: str, pretrained: Tensor | None = None) -> Tensor:
        """The (dequantized) float32 task vector of ``task`` for ``key``."""
        return self.task_vectors(key, [task], pretrained)[0]

    def task_vectors(self, key: str, tasks: Sequence[str] | None = None, pretrained: Tensor | None = None) -> list[Tensor]:
        """One key's task vectors for several tasks, sharing work (RTVQ's base is decoded once)."""
        tasks = self.tasks if tasks is None else list(tasks)
        info, impl, cfg = self._info(key), self.scheme_impl, self.config
        shared = None
        if info.quantized:
            if impl.needs_pretrained and pretrained is None:
                raise StoreError(f"store {self.path} ({cfg.label}) holds quantized fine-tuned weights: its task "
                                 f"vectors need the pre-trained weights; pass --pretrained")
            try:
                shared = impl.decode_shared(cfg, info, self.shared_parts(key), pretrained)
            except _DECODE_ERRORS as e:
                raise self._damaged(key, self.layout.base.file if self.layout.base else "", e) from None

        def decode(t: str) -> Tensor:
            try:
                tau = impl.decode(cfg, info, self.parts(t, key), shared)
            except _DECODE_ERRORS as e:
                raise self._damaged(key, self.layout.tasks[t].file, e) from None
            if tau is None:
                return torch.zeros(info.shape)
            if tuple(tau.shape) != tuple(info.shape):
                raise self._damaged(key, self.layout.tasks[t].file, ValueError(f"shape {tuple(tau.shape)}, layout {info.shape}"))
            return tau

        return parallel_map(decode, tasks) if info.quantized else [decode(t) for t in tasks]

    def iter_task_vector(self, task: str, pretrained: Mapping[str, Tensor] | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(key, tau)`` for every key, one at a time."""
        for key in self.keys:
            yield key, self.task_vector(task, key, None if pretrained is None else pretrained[key])

    def task_state_dict(self, task: str, pretrained: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return dict(self.iter_task_vector(task, pretrained))

    def release(self) -> None:
        """Drop resident pages of every open file (streaming passes call this after each key)."""
        for f in self._files.values():
            f.release()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "TaskVectorStore":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TaskVectorStore({str(self.path)!r}, scheme={self.config.label}, tasks={self.tasks})"


class _Parts(Mapping):
    """One key's stored tensors in one file, by suffix (``""`` is the key itself), verified on first read."""

    def __init__(self, store: TaskVectorStore, rel: str, key: str):
        self.store, self.rel, self.key = store, rel, key
        self.f = store._open(rel)

    def __getitem__(self, suffix: str) -> Tensor:
        return self.store.read(self.rel, self.key + suffix)

    def __contains__(self, suffix: object) -> bool:
        return isinstance(suffix, str) and self.key + suffix in self.f

    def __iter__(self) -> Iterator[str]:
        n = len(self.key)
        return (k[n:] for k in self.f.keys() if k.startswith(self.key) and (len(k) == n or k[n] == "#"))

    def __len__(self) -> int:
        return sum(1 for _ in self)
