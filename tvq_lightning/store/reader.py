"""Lazy reading of a store: one task's one key is dequantized without reading the rest.

Task files are opened with the zero-copy safetensors reader, so asking for a key maps only that
key's packed codes from disk.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, FingerprintMismatch, StoreError
from ..quant.kernels import parallel_map
from ..quant.qtensor import QTensor
from .checkpoints import LazyStateDict, open_checkpoint
from .fingerprint import fingerprint_state_dict, short_fingerprint
from .layout import LAYOUT_FILE, KeyInfo, Layout, read_layout


class TaskVectorStore:
    """A read-only view of a store directory.

    Example::

        store = TaskVectorStore("runs/vitb32-tvq4")
        store.check_pretrained(theta0)                  # fingerprint must match
        tau = store.task_vector("cars", "conv1.weight")  # float32, only that key is read
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout: Layout = read_layout(self.path)
        self._files: dict[str, LazyStateDict] = {}

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
            self._files[rel] = f
        return f

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
        return StoreError(f"store {self.path}: key {key!r} in {Path(file).name} is damaged ({e}); re-create the store")

    # -- stored tensors ---------------------------------------------------------------------
    def parts(self, task: str, key: str) -> _Parts:
        """What ``task`` stores for ``key``: a mapping from suffix (``""``, ``"#q"``, ...) to tensor."""
        self._info(key)
        return _Parts(self._task_file(task), key)

    def shared_parts(self, key: str) -> _Parts | None:
        """What the shared file (RTVQ's base) stores for ``key``; None without a shared file."""
        self._info(key)
        return None if self.layout.base is None else _Parts(self._open(self.layout.base.file), key)

    def qtensor(self, task: str, key: str) -> QTensor | None:
        """The affine codes of ``task``'s key (RTVQ: its offset); None if zero, not quantized or
        not affine codes (see :meth:`parts`)."""
        info = self._info(key)
        if not info.quantized:
            return None
        try:
            return self.scheme_impl.qtensor(self.config, info, self.parts(task, key))
        except (KeyError, ValueError) as e:
            raise self._damaged(key, self.layout.tasks[task].file, e) from None

    def base_qtensor(self, key: str) -> QTensor | None:
        """The shared file's affine codes for ``key`` (RTVQ's base; None for other schemes or zero keys)."""
        info = self._info(key)
        if self.layout.base is None or not info.quantized:
            return None
        try:
            return self.scheme_impl.qtensor(self.config, info, self.shared_parts(key), info.base_bits)
        except (KeyError, ValueError) as e:
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
            except (KeyError, ValueError) as e:
                raise self._damaged(key, self.layout.base.file if self.layout.base else "", e) from None

        def decode(t: str) -> Tensor:
            try:
                tau = impl.decode(cfg, info, self.parts(t, key), shared)
            except (KeyError, ValueError) as e:
                raise self._damaged(key, self.layout.tasks[t].file, e) from None
            return torch.zeros(info.shape) if tau is None else tau

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
    """One key's stored tensors in one file, by suffix (``""`` is the key itself)."""

    def __init__(self, f: LazyStateDict, key: str):
        self.f, self.key = f, key

    def __getitem__(self, suffix: str) -> Tensor:
        return self.f[self.key + suffix]

    def __contains__(self, suffix: object) -> bool:
        return isinstance(suffix, str) and self.key + suffix in self.f

    def __iter__(self) -> Iterator[str]:
        n = len(self.key)
        return (k[n:] for k in self.f.keys() if k.startswith(self.key) and (len(k) == n or k[n] == "#"))

    def __len__(self) -> int:
        return sum(1 for _ in self)
