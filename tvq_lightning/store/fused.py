"""Per-tensor TVQ of one key for every task at once, cache-blocked, straight into the task files.

The general path (:mod:`.encode`) forms each task vector ``tau = theta_t - theta_0`` in a buffer
and then quantizes it: per task, theta_t and theta_0 are read, tau is written and read back. For
per-tensor TVQ of float32 weights (the paper's setting) this module instead makes two passes
over the key in cache-sized chunks, every task's chunk in turn against the same theta_0 chunk,
which is therefore read from memory once for all tasks:

1. range: min, max and finiteness of ``theta_t - theta_0`` per task (:func:`.fused_kernels.ranges`);
2. codes: ``theta_t - theta_0`` formed again, quantized and packed (:func:`.fused_kernels.codes`)
   into a staging buffer, and written with ``pwrite`` at the key's place in each task file
   (:meth:`~.st_stream.SafetensorsStreamWriter.reserve`).

Forming the difference twice costs less than storing it: per task the passes stream theta_t twice,
where subtract-store-reload moves about five times its size. The key is cut into one part per
worker thread (:func:`~..quant.kernels.submit`); each pass over a part is one compiled call for all
tasks (between writes), which runs without the GIL. theta_0's CRC-32 (its fingerprint entry) is
taken by :func:`.fingerprint.crc32` (which also releases the GIL): the first part's after pass 1, the rest
after pass 2, continuing from the first part's value, so both threads share that work. The bytes
written are identical to ``QTensor.quantize(tau, spec, value_range=(lo, hi)).state(key)``.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..quant.affine import affine_params
from ..quant.kernels import num_workers, numba_enabled, submit
from ..quant.qtensor import CODES, SCALE, ZERO
from .checkpoints import LazyStateDict
from .encode import non_finite, task_vector_into
from .fingerprint import crc32, entry_with_crc
from .fused_kernels import codes, ranges, task_vectors
from .st_stream import SafetensorsStreamWriter
from .layout import KeyInfo, StoreConfig
from .sources import Source

CHUNK = 1 << 18  #: elements per cache block (1 MiB of theta_0, in cache while every task uses it)
STAGE_BYTES = 1 << 20  #: packed bytes per task per write (a 32 KiB write costs half again as much per byte)
_MIN_PART = 1 << 16  # elements: a smaller key is not cut between threads
_local = threading.local()


def _compiled(tensors: Sequence[Tensor]) -> bool:
    """Whether the compiled loops take these tensors: float32, contiguous, on the CPU, with numba."""
    return numba_enabled() and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                                   and not t.requires_grad for t in tensors)


def eligible(cfg: StoreConfig, info: KeyInfo, tensors: Sequence[Tensor]) -> bool:
    """Whether the key can take this path: the scheme encodes it as per-tensor affine codes of
    tau (``Scheme.fused_spec``: per-tensor TVQ), of float32 CPU tensors, with numba."""
    return (info.quantized and info.numel > 0 and cfg.scheme_impl.fused_spec(cfg, info) is not None
            and _compiled(tensors))


def small_task_vectors(key: str, pretrained: Tensor, finetuned: Sequence[Tensor],
                       labels: Sequence[str]) -> list[tuple[Tensor, float, float]]:
    """:func:`.encode.task_vector_into` of every task for a small key (``(tau, lo, hi)`` each), all
    tasks in one compiled call where it runs: a small key costs little but per-call overhead."""
    if pretrained.numel() == 0 or not _compiled([pretrained, *finetuned]):
        return [task_vector_into(f, pretrained, torch.empty(pretrained.shape), label=lab, key=key)
                for f, lab in zip(finetuned, labels)]
    taus = torch.empty(len(finetuned), pretrained.numel())
    lo, hi, finite = task_vectors(tuple(f.reshape(-1).numpy() for f in finetuned), pretrained.reshape(-1).numpy(),
                                  taus.numpy())
    if not all(finite):
        raise non_finite(labels[finite.index(False)], key)
    return [(taus[t].view(pretrained.shape), lo[t], hi[t]) for t in range(len(finetuned))]


def _parts(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges covering ``[0, n)``, cut at multiples of 8 (whole bytes of codes)."""
    count = max(1, min(count, n // _MIN_PART))
    cuts = [0] + [n * i // count // 8 * 8 for i in range(1, count)] + [n]
    return list(zip(cuts[:-1], cuts[1:]))


def encode_key(key: str, pretrained: Tensor, finetuned: Sequence[Tensor], labels: Sequence[str], info: KeyInfo,
               cfg: StoreConfig, writers: Sequence[SafetensorsStreamWriter], crc: bool) -> tuple | None:
    """Quantize ``finetuned[i] - pretrained`` per tensor into ``writers[i]`` for every task ``i``.

    A task whose vector is zero on this key stores nothing for it (as :func:`.encode.encode_single`).
    Raises :class:`~..errors.NonFiniteError` for NaN / Inf. Returns theta_0's fingerprint entry
    (:func:`.fingerprint.tensor_entry`) when ``crc``, else None.
    """
    job = KeyJob(key, pretrained, finetuned, labels, info, cfg, writers, crc)
    try:
        job.reserve()
        return job.finish()
    finally:
        job.wait()


class KeyJob:
    """:func:`encode_key` in three steps, so that a caller can overlap keys and its own work.

    Created, it queues the range pass on the shared pool (:func:`~..quant.kernels.submit`);
    :meth:`reserve` waits for it, reserves the key's tensors in every task file (the one step that
    must follow the files' order) and queues the codes pass; :meth:`finish` waits for that and
    returns the fingerprint entry. :meth:`wait` waits for whatever is queued, raising nothing.
    """

    def __init__(self, key: str, pretrained: Tensor, finetuned: Sequence[Tensor], labels: Sequence[str],
                 info: KeyInfo, cfg: StoreConfig, writers: Sequence[SafetensorsStreamWriter], crc: bool):
        self.key, self.pretrained, self.labels, self.info, self.writers = key, pretrained, labels, info, writers
        self.b = pretrained.reshape(-1).numpy()
        self.tasks = tuple(f.reshape(-1).numpy() for f in finetuned)
        self.raw = memoryview(self.b.view(np.uint8)) if crc else None
        self.parts = _parts(info.numel, num_workers())
        self.last = len(self.parts) - 1
        self.spec = cfg.scheme_impl.fused_spec(cfg, info)
        self._codes: list = []
        self._ranges = [submit(self._range_part, p) for p in range(len(self.parts))]

    def _crc(self, part: int, c: int) -> int:
        """theta_0's CRC-32 continued over its bytes that ``part`` covers: part 0's part in the range
        pass, the others' (in order) in the last part's codes pass."""
        if self.raw is None:
            return c
        start, end = (0, self.parts[0][1]) if part == 0 else (self.parts[0][1], self.info.numel)
        return crc32(self.raw[4 * start:4 * end], c)

    def _range_part(self, part: int) -> tuple[list[float], list[float], list[bool], int]:
        lo, hi, finite = ranges(self.tasks, self.b, *self.parts[part], CHUNK)
        return lo, hi, finite, self._crc(0, 0) if part == 0 else 0

    def reserve(self) -> None:
        found = self.found = [f.result() for f in self._ranges]
        n, key = len(self.tasks), self.key
        lo = [min(f[0][t] for f in found) for t in range(n)]
        hi = [max(f[1][t] for f in found) for t in range(n)]
        for t in range(n):
            if not all(f[2][t] for f in found):
                raise non_finite(self.labels[t], key)
        s, z, scale = affine_params(torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32), self.spec)
        self.active = [t for t in range(n) if not (lo[t] == 0.0 and hi[t] == 0.0)]
        nbytes = (self.info.numel * self.spec.bits + 7) // 8
        self.offsets = {}
        zi, sc = z.to(torch.int32).numpy(), scale.numpy()
        for t in self.active:
            w = self.writers[t]
            self.offsets[t] = w.reserve(key + CODES, "U8", [nbytes], nbytes)
            w.add_bytes(key + ZERO, "I32", [1], zi[t:t + 1])
            w.add_bytes(key + SCALE, "F32", [1], sc[t:t + 1])
        self.sv, self.zv = s.to(torch.float32).numpy(), z.to(torch.float32).numpy()
        self._codes = [submit(self._codes_part, p) for p in range(len(self.parts))]

    def _codes_part(self, part: int) -> int:
        c = self._crc(part, self.found[0][3]) if part == self.last > 0 else self.found[0][3]
        bits, start, end = self.spec.bits, *self.parts[part]
        step = max(8, STAGE_BYTES * 8 // bits // 8 * 8)  # elements per write: whole groups of 8 codes
        row = (step * bits + 7) // 8
        out = _stage(len(self.active) * row)
        active = np.array(self.active, np.int64)
        pos = start * bits // 8
        for s0 in range(start, end, step):
            nbytes = codes(self.tasks, self.b, s0, min(s0 + step, end), CHUNK, self.sv, self.zv, bits, active, out, row)
            for i, t in enumerate(self.active):
                self.writers[t].write_at(self.offsets[t] + pos, out[i * row:i * row + nbytes])
            pos += nbytes
        return c

    def finish(self) -> tuple | None:
        c = [f.result() for f in self._codes][self.last]
        return entry_with_crc(self.pretrained, c) if self.raw is not None else None

    def wait(self) -> None:
        for f in self._ranges + self._codes:
            with contextlib.suppress(BaseException):
                f.result()


def _stage(nbytes: int) -> np.ndarray:
    """A per-thread buffer of at least ``nbytes`` for packed codes, reused across keys."""
    buf = getattr(_local, "stage", None)
    if buf is None or buf.size < nbytes:
        buf = _local.stage = np.empty(nbytes, np.uint8)
    return buf


class Pipeline:
    """Keys of :func:`.writer._encode_all` whose tensors are reserved in the task files later, in key order.

    A :class:`KeyJob` is reserved once the next one is queued (its range pass has run
    meanwhile) and finished once the one after is reserved, so the pool always has work queued;
    small keys computed meanwhile are written right after the key before them. A finished
    key's mapped pages are dropped on the pool (:meth:`.checkpoints.LazyStateDict.release`).
    """

    def __init__(self, sources: list[Source], fingerprint: dict[str, tuple] | None):
        self.sources, self.fingerprint = [s.sd for s in sources if isinstance(s.sd, LazyStateDict)], fingerprint
        self.queued: list[tuple[str, object, list]] = []  # (key, KeyJob or small key's entry, small key's parts)
        self.running: list[tuple[str, KeyJob]] = []  # reserved, codes pass queued
        self.all: list[KeyJob] = []

    def fused(self, key: str, job: KeyJob) -> None:
        self.all.append(job)
        self._reserve()
        self._finish(keep=1)
        self.queued.append((key, job, []))

    def small(self, key: str, entry: tuple | None, parts: list) -> None:
        self.queued.append((key, entry, parts))

    def drain(self) -> None:
        """Reserve and finish everything queued (before a key encoded the plain way)."""
        self._reserve()
        self._finish(keep=0)

    def wait(self) -> None:
        """Wait for the pool's work on every job (on errors: before the files are closed)."""
        for job in self.all:
            job.wait()

    def _reserve(self) -> None:
        for key, job, parts in self.queued:
            if isinstance(job, KeyJob):
                job.reserve()
                self.running.append((key, job))
            else:
                for w, named in parts:
                    w.add_all(named)
                if self.fingerprint is not None:
                    self.fingerprint[key] = job
        self.queued = []

    def _finish(self, keep: int) -> None:
        while len(self.running) > keep:
            key, job = self.running.pop(0)
            entry = job.finish()
            if self.fingerprint is not None:
                self.fingerprint[key] = entry
            submit(self._release, key)

    def _release(self, key: str) -> None:
        for sd in self.sources:
            sd.release(key)
