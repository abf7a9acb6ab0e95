"""Task vectors kept on the device in their packed form, dequantized one (key, task) at a time.

Memory design. Test-time adaptation (AdaMerging) re-merges the model at every optimizer step, so
the task vectors must live on the accelerator. Holding T dequantized float32 copies there costs
``4 T P`` bytes for a model of P parameters; :class:`PackedTaskVectors` instead registers, per
store key and task, exactly what the store holds:

- quantized keys: exactly the tensors the store holds for them (TVQ / FQ: the uint8 packed
  codes, ``b`` bits per entry, the int32 zero-points and the float32 scales, one per block:
  ``b P / 8`` bytes per task; BitDelta: 1-bit signs and the scales), decoded by the store's
  scheme object (``Scheme.decode``, the same code the store reader runs);
- a shared file's parts (RTVQ: the base's packed codes) once per key; FQ: theta_0's key once;
- full-precision keys (biases, norms; every key of an fp32 store): the float32 task vector;
- a task vector that is exactly zero: nothing.

All of them are *non-persistent buffers*: ``module.to(device)`` moves the packed codes (never a
float copy per task), checkpoints do not duplicate the store, and DDP can be told to ignore them
(:meth:`buffer_names`). :meth:`dequantize` decodes one task's key on the module's device with
torch ops (works on CUDA); on CPU, without autograd, the numba kernel of
:meth:`~tvq_lightning.quant.qtensor.QTensor.dequantize` is used. The largest float tensor ever
alive is one key's task vector (plus the running merged weight in :mod:`.merge_fn`).

AdaMerging++ (``ties=TiesConfig(...)``): the per-task TIES-trimmed, sign-elected vectors are
*not* stored. At build time the global per-task trim thresholds v_t come from
:class:`~tvq_lightning.merging.methods.ties.Ties`' two exact streaming passes, and the elected
sign per key (``sign(sum_t trimmed tau_t)``, zero sums resolved to the whole model's majority
sign, as TIES does) is kept as 2-bit codes (one per entry and key, shared by all tasks). Each
:meth:`dequantize` then re-applies ``keep = |tau_t| >= v_t and sign(tau_t) == gamma`` to the
freshly decoded vector.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import StoreError
from ..merging.engine import plan_merge, run_passes
from ..merging.methods.ties import Ties, TiesConfig
from ..quant.packing import pack_codes, unpack_codes
from ..store.layout import KeyInfo
from ..store.reader import TaskVectorStore


@dataclass
class _KeyEntry:
    """How one key's buffers are laid out: per task ``"q"`` (scheme parts), ``"v"`` (float) or None."""

    index: int
    shape: tuple[int, ...]
    info: KeyInfo | None = None
    kinds: list[str | None] = field(default_factory=list)
    suffixes: list[tuple[str, ...]] = field(default_factory=list)  # per task: the stored parts' suffixes
    shared: tuple[str, ...] | None = None  # the shared file's parts (RTVQ's base), if any
    pre: bool = False         # theta_0's key is held (the scheme decodes against it: FQ)
    elect: bool = False       # a 2-bit elected-sign buffer exists (AdaMerging++)


def _buffer_name(prefix: str, suffix: str) -> str:
    """``k3_t1`` + ``#q`` -> ``k3_t1_q``; the full-precision part ``""`` -> ``k3_t1_v``."""
    return prefix + ("_" + suffix.lstrip("#") if suffix else "_v")


class _BufferParts(Mapping):
    """A key's parts held as buffers of ``module``, by suffix (the scheme decodes from this)."""

    def __init__(self, module: nn.Module, prefix: str, suffixes: Sequence[str]):
        self.module, self.prefix, self.suffixes = module, prefix, suffixes

    def __getitem__(self, suffix: str) -> Tensor:
        if suffix not in self.suffixes:
            raise KeyError(suffix)
        return getattr(self.module, _buffer_name(self.prefix, suffix))

    def __iter__(self) -> Iterator[str]:
        return iter(self.suffixes)

    def __len__(self) -> int:
        return len(self.suffixes)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class PackedTaskVectors(nn.Module):
    """Every (key, task) task vector of a store, as packed buffers (see the module docstring).

    Args:
        store: a store path or :class:`TaskVectorStore`.
        pretrained: theta_0's state dict (must have the store's fingerprint; FQ also reads it).
        tasks: the tasks to hold, in coefficient order (default: the store's).
        ties: AdaMerging++: a :class:`TiesConfig` (or True for the defaults, k = 0.2) to hold the
            TIES-trimmed, sign-elected vectors instead of the raw ones.
    """

    def __init__(self, store: str | TaskVectorStore, pretrained: Mapping[str, Tensor],
                 tasks: Sequence[str] | None = None, ties: TiesConfig | bool | None = None):
        super().__init__()
        own = not isinstance(store, TaskVectorStore)
        store = TaskVectorStore(store) if own else store
        try:
            self._build(store, pretrained, tasks, ties)
        finally:   # every buffer is a copy: the store's mapped files are no longer needed
            if own:
                store.close()
            else:
                store.release()

    def _build(self, store: TaskVectorStore, pretrained, tasks, ties) -> None:
        store.check_pretrained(pretrained)
        self.tasks = list(store.tasks if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in store.layout.tasks]
        if unknown or not self.tasks:
            raise StoreError(f"store {store.path} has no task {unknown[0] if unknown else '(none given)'!r}; "
                             f"it has: {', '.join(store.tasks)}")
        missing = [k for k in store.keys if k not in pretrained]
        if missing:
            raise StoreError(f"the pre-trained weights lack key {missing[0]!r} of store {store.path}; "
                             "the encoder must be the model the store was built from")
        self.keys = list(store.keys)
        self.scheme = store.scheme
        self.config = store.config
        self.scheme_impl = store.scheme_impl
        self.store_path = str(store.path)
        self.fingerprint = store.fingerprint
        self.ties = TiesConfig() if ties is True else (ties or None)
        self.thresholds: list[float] = []
        self._entries: dict[str, _KeyEntry] = {}
        for i, key in enumerate(self.keys):
            self._entries[key] = self._register_key(store, i, key, pretrained[key])
        if self.ties is not None:
            self._build_election(store, pretrained)

    # -- construction --------------------------------------------------------------------------
    def _put(self, name: str, t: Tensor) -> None:
        self.register_buffer(name, t.detach().contiguous().clone(), persistent=False)

    def _put_parts(self, prefix: str, parts: Mapping[str, Tensor]) -> tuple[str, ...]:
        suffixes = tuple(parts)
        for s in suffixes:
            self._put(_buffer_name(prefix, s), parts[s])
        return suffixes

    def _register_key(self, store: TaskVectorStore, i: int, key: str, theta0: Tensor) -> _KeyEntry:
        info = store.layout.keys[key]
        e = _KeyEntry(i, tuple(int(d) for d in info.shape), info)
        if not info.quantized:
            for t, tau in enumerate(store.task_vectors(key, self.tasks)):
                nonzero = bool(tau.ne(0).any())
                e.kinds.append("v" if nonzero else None)
                e.suffixes.append(("",) if nonzero else ())
                if nonzero:
                    self._put(f"k{i}_t{t}_v", tau.float())
            return e
        shared = store.shared_parts(key)
        if shared is not None and len(shared):
            e.shared = self._put_parts(f"k{i}_base", shared)
        if self.scheme_impl.needs_pretrained:
            e.pre = True
            self._put(f"k{i}_pre", theta0.float())  # FQ baseline only: one theta_0 copy of the key
        for t, task in enumerate(self.tasks):
            parts = store.parts(task, key)
            e.kinds.append("q" if len(parts) else None)
            e.suffixes.append(self._put_parts(f"k{i}_t{t}", parts))
        return e

    def _build_election(self, store: TaskVectorStore, pretrained: Mapping[str, Tensor]) -> None:
        """Global trim thresholds (Ties' passes) and the per-key elected sign, as 2-bit codes."""
        ties = Ties(self.ties)
        run_passes(plan_merge(store, pretrained, ties, tasks=self.tasks))
        self.thresholds = [float(v) for v in ties.thresholds]
        sums, total = {}, 0.0
        for key in self.keys:
            s, e = None, self._entries[key]
            for t, tau in self._iter_raw(key):
                tau = self._elect(e, t, tau, None)           # trimmed
                s = tau if s is None else s.add_(tau)
            if s is not None:
                g = torch.sign(s)
                total += float(g.sum(dtype=torch.float64))
                sums[key] = g
        majority = float(torch.sign(torch.tensor(total)))
        for key, g in sums.items():
            g = torch.where(g == 0, torch.full_like(g, majority), g)
            self._put(f"k{self._entries[key].index}_sign", pack_codes((g + 1).to(torch.uint8).reshape(-1), 2))
            self._entries[key].elect = True

    # -- decoding ------------------------------------------------------------------------------
    def _buf(self, name: str) -> Tensor:
        return getattr(self, name)

    def _shared(self, e: _KeyEntry):
        """What the scheme needs for every task of the key (RTVQ: the decoded base; FQ: theta_0)."""
        shared = None if e.shared is None else _BufferParts(self, f"k{e.index}_base", e.shared)
        pre = self._buf(f"k{e.index}_pre") if e.pre else None
        return self.scheme_impl.decode_shared(self.config, e.info, shared, pre)

    def _iter_raw(self, key: str, tasks: Sequence[int] | None = None,
                  readonly: bool = False) -> Iterator[tuple[int, Tensor]]:
        """``(t, tau_t)`` (untrimmed float32 tensors) for the non-zero tasks of ``key``: fresh ones,
        or with ``readonly`` exact vectors are the packed buffers themselves (no copy)."""
        e = self._entry(key)
        shared, decoded = None, False
        for t in range(len(self.tasks)) if tasks is None else tasks:
            kind = e.kinds[t]
            if kind is None:
                continue
            if kind == "v":
                v = self._buf(f"k{e.index}_t{t}_v")
                yield t, v if readonly else v.clone()
                continue
            if not decoded:
                shared, decoded = self._shared(e), True
            parts = _BufferParts(self, f"k{e.index}_t{t}", e.suffixes[t])
            yield t, self.scheme_impl.decode(self.config, e.info, parts, shared)

    def _elect(self, e: _KeyEntry, t: int, tau: Tensor, gamma: Tensor | None) -> Tensor:
        keep = tau.abs() >= self.thresholds[t]
        if gamma is not None:
            keep &= torch.sign(tau) == gamma
        keep &= tau != 0
        return tau.masked_fill_(~keep, 0.0)

    def _gamma(self, e: _KeyEntry) -> Tensor | None:
        if not e.elect:
            return None
        codes = unpack_codes(self._buf(f"k{e.index}_sign"), 2, _numel(e.shape))
        return (codes.to(torch.float32) - 1.0).view(e.shape)

    def iter_task_vectors(self, key: str, tasks: Sequence[int] | None = None,
                          readonly: bool = False) -> Iterator[tuple[int, Tensor]]:
        """``(t, tau_t)`` for the tasks whose vector for ``key`` is non-zero, one at a time.

        Each ``tau_t`` is a fresh float32 tensor on the module's device (the caller may modify
        it); RTVQ's base is decoded once per call. With ``ties``, the trimmed, elected vector.
        ``readonly=True`` promises not to modify them: exact (fp32) vectors are then yielded
        without a copy (the adaptation hot path reads them twice per step).
        """
        if self.ties is None:
            yield from self._iter_raw(key, tasks, readonly)
            return
        e = self._entry(key)
        gamma = self._gamma(e)
        for t, tau in self._iter_raw(key, tasks):
            yield t, self._elect(e, t, tau, gamma)

    def dequantize(self, key: str, t: int) -> Tensor:
        """Task ``t``'s (index into :attr:`tasks`) float32 vector for ``key`` (zeros if none)."""
        for _, tau in self.iter_task_vectors(key, [t]):
            return tau
        return torch.zeros(self._entry(key).shape, device=self.device)

    # -- introspection -------------------------------------------------------------------------
    def _entry(self, key: str) -> _KeyEntry:
        e = self._entries.get(key)
        if e is None:
            raise StoreError(f"store {self.store_path} has no key {key!r}")
        return e

    def has_vector(self, key: str) -> bool:
        """False when every task's vector for ``key`` is zero (the merged weight is theta_0's)."""
        return any(k is not None for k in self._entry(key).kinds)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    @property
    def device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def buffer_names(self, prefix: str = "") -> list[str]:
        """Fully qualified buffer names (for DDP's ``_ddp_params_and_buffers_to_ignore``)."""
        return [prefix + n for n, _ in self.named_buffers()]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        plus = f", ties(k={self.ties.k})" if self.ties else ""
        return f"store={self.store_path!r}, tasks={self.tasks}, keys={len(self.keys)}, {self.nbytes()} bytes{plus}"
