"""Building a store and adding tasks to it, streaming key by key.

Memory holds one key of the pre-trained model and (RTVQ) that key's T task vectors at a time;
each task file is written tensor by tensor (:class:`~.st_stream.SafetensorsStreamWriter`). A new store
is assembled in a staging directory and moved into place when complete; adding tasks writes new
files and then atomically replaces ``layout.json``, so an interrupted run leaves the store as it
was.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..errors import OutputExistsError, QuantConfigError, TvqError
from ..quant.allocation import Allocation
from ..quant.policy import is_quantized
from ..quant.kernels import parallel_map
from . import fused
from .encode import encode_joint, encode_single, scratch, task_vector_into
from .fingerprint import combine_entries, tensor_entry
from .io import atomic_write_json, check_output, clean_stale, output_errors, staged_directory
from .st_stream import SafetensorsStreamWriter, header_upper_bound
from .layout import LAYOUT_FILE, KeyInfo, Layout, StoreConfig, TaskInfo, is_store
from .reader import TaskVectorStore
from .sources import Source, WeightsLike, check_compatible, check_task_name, floating_keys, open_source

#: adding tasks to a store with a shared file (RTVQ's base): keep it, or recompute it over all tasks;
#: None (default): frozen when it was built from two or more tasks, else recomputed
RtvqBaseMode = Literal["frozen", "recompute"]


def _key_infos(pre: dict[str, tuple[tuple[int, ...], torch.dtype]], cfg: StoreConfig,
               allocation=None) -> dict[str, KeyInfo]:
    impl = cfg.scheme_impl
    infos = {}
    for k, (shape, dtype) in pre.items():
        dname = str(dtype).removeprefix("torch.")
        if impl.quantizes and is_quantized(k, shape, dtype, cfg.policy):
            infos[k] = KeyInfo(tuple(shape), dname, True, **impl.key_widths(cfg, k, allocation))
        else:
            infos[k] = KeyInfo(tuple(shape), dname, False)
    return infos


def _writer(path: Path, infos: dict[str, KeyInfo], cfg: StoreConfig, metadata: dict[str, str],
            quantized_only: bool = False) -> SafetensorsStreamWriter:
    specs: dict[str, tuple[str, int]] = {}
    total = 0
    for k, info in infos.items():
        if info.quantized:
            parts, nbytes = cfg.scheme_impl.stored_parts(cfg, info)
            specs.update({k + suffix: spec for suffix, spec in parts.items()})
            total += nbytes
        elif not quantized_only:
            specs[k] = ("F32", len(info.shape))
            total += 4 * info.numel
    return SafetensorsStreamWriter(path, header_upper_bound(specs, total), metadata, checksums=True)


def _progress(it, desc: str, show: bool):
    return tqdm(it, desc=desc, unit="key", disable=not show, leave=False)


def _allocate(pre: Source, fts: list[Source], pre_keys, cfg: StoreConfig, sensitivity, show: bool):
    """First streaming pass of a --budget run: per-key error tables, then the allocator."""
    from ..quant.allocation import allocate_bits, key_error_table

    infos = _key_infos(pre_keys, cfg)
    tables = {}
    for k in _progress([k for k, i in infos.items() if i.quantized], "measuring sensitivity", show):
        p = pre.sd[k]
        taus = [task_vector_into(f.sd[k], p, torch.empty(p.shape), label=f.label, key=k)[0] for f in fts]
        tables[k] = key_error_table(taus, cfg.scheme, spec=cfg.spec(cfg.bits), error_correction=cfg.error_correction)
    if not tables:
        raise QuantConfigError("--budget was given but no tensor is quantized under this policy")
    return allocate_bits(tables, cfg.budget, num_tasks=len(fts), scheme=cfg.scheme, per_tensor=cfg.per_tensor_bits,
                         sensitivity=sensitivity)


def _check_allocation(allocation: Allocation, pre_keys, cfg: StoreConfig) -> None:
    """A given allocation must be for this scheme and give a width to every quantized key."""
    if allocation.scheme != cfg.scheme:
        raise QuantConfigError(f"the allocation is for {allocation.scheme}, the store config is {cfg.scheme}; use one scheme")
    fields = cfg.scheme_impl.allocation_fields
    missing = [k for k, i in _key_infos(pre_keys, cfg).items()
               if i.quantized and not all(k in getattr(allocation, f) for f in fields)]
    if missing:
        raise QuantConfigError(f"the allocation has no width for quantized key {missing[0]!r} ({len(missing)} "
                               f"missing); allocate over the same keys and policy ({cfg.policy!r})")


def _allocation_record(allocation: Allocation, sensitivity: Mapping[str, float] | None) -> dict:
    """The layout's ``allocation`` entry: the allocation, its one-line description, the weights."""
    record = {**allocation.to_json(), "description": allocation.describe()}
    if sensitivity is not None:
        record["sensitivity"] = {k: float(v) for k, v in sensitivity.items()}
    return record


def _encode_all(pre: Source, fts: list[Source], infos: dict[str, KeyInfo], cfg: StoreConfig,
                task_writers: list[SafetensorsStreamWriter], base_writer: SafetensorsStreamWriter | None,
                show: bool, frozen_base: TaskVectorStore | None = None,
                fingerprint: dict[str, tuple] | None = None) -> None:
    """The main pass: for each key read theta_0 and every task's weights, encode, append.

    Tasks of one key are encoded in parallel threads (the kernels release the GIL); task ``i``'s
    file is only appended to by the thread handling task ``i`` of the current key. A scheme with a
    shared file (RTVQ) encodes a key of every task at once (:func:`.encode.encode_joint`) unless
    the shared file stays frozen (``frozen_base``: tasks added to a store). A key the scheme
    encodes as per-tensor affine codes of tau (``Scheme.fused_spec``: per-tensor TVQ) of float32
    weights takes the cache-blocked path of :mod:`.fused` instead, pipelined
    (:class:`.fused.Pipeline`): while the pool works on those keys, this thread encodes the small keys
    and the pool drops the finished keys' mapped pages. When ``fingerprint`` is a dict, theta_0's
    per-key fingerprint entries are computed alongside, not in a separate pass over theta_0.
    """
    tasks = list(range(len(fts)))
    jobs = tasks + ([-1] if fingerprint is not None else [])
    released = 0
    impl = cfg.scheme_impl
    joint = impl.shared_file and frozen_base is None
    # a joint encode needs every task's vector of a key at once: one reusable buffer per task (no page faults)
    biggest = max((i.numel for i in infos.values() if i.quantized), default=0)
    joint_bufs = [torch.empty(biggest) for _ in tasks] if joint else []
    pipe = fused.Pipeline([pre, *fts], fingerprint)
    try:
        for k in _progress(list(infos), "quantizing" if impl.quantizes else "writing", show):
            info = infos[k]
            p = pre.sd[k]
            if frozen_base is None and fused.eligible(cfg, info, tensors := [p, *(f.sd[k] for f in fts)]):
                pipe.fused(k, fused.KeyJob(k, p, tensors[1:], [f.label for f in fts], info, cfg, task_writers,
                                           fingerprint is not None))
                continue
            if not impl.shared_file and frozen_base is None and info.numel < _SMALL:  # in order, after the pool's keys
                entry = tensor_entry(p) if fingerprint is not None else None
                res = fused.small_task_vectors(k, p, tensors[1:], [f.label for f in fts])
                pipe.small(k, entry, [(w, encode_single(*r, info, cfg, k, finetuned=t))
                                      for w, t, r in zip(task_writers, tensors[1:], res)])
                continue
            pipe.drain()
            if joint and info.quantized:
                def decode(i: int):
                    if i < 0:
                        fingerprint[k] = tensor_entry(p)
                        return None
                    return task_vector_into(fts[i].sd[k], p, joint_bufs[i][: info.numel].view(info.shape), label=fts[i].label, key=k)

                res = _map(decode, jobs, info.numel)[: len(tasks)]
                shared, per_task = encode_joint([r[0] for r in res], [(r[1], r[2]) for r in res], info, cfg, k)
                for w, named in [(base_writer, shared), *zip(task_writers, per_task)]:
                    w.add_all(named)
            else:
                shared = None
                if frozen_base is not None and info.quantized:
                    shared = impl.decode_shared(cfg, info, frozen_base.shared_parts(k))

                def work(i: int) -> None:
                    if i < 0:
                        fingerprint[k] = tensor_entry(p)
                        return
                    f, w = fts[i], task_writers[i]
                    tau, lo, hi = task_vector_into(f.sd[k], p, scratch(info.numel).view(info.shape), label=f.label, key=k)
                    w.add_all(encode_single(tau, lo, hi, info, cfg, k, finetuned=f.sd[k], shared=shared))

                _map(work, jobs, info.numel)
            released += 4 * info.numel * (len(fts) + 1)
            if released > _RELEASE_BYTES:
                _release(pre, fts)
                released = 0
        pipe.drain()
    finally:
        pipe.wait()
    _release(pre, fts)


_SMALL = 1 << 16  # elements per tensor below which a key's tasks are encoded in this thread


def _map(fn, jobs: list[int], numel: int) -> list:
    """``fn`` over a key's jobs: in the worker threads, or here for a small key (biases, norms),
    whose Python work would only pass the GIL back and forth between threads."""
    return parallel_map(fn, jobs) if numel >= _SMALL else [fn(i) for i in jobs]


_RELEASE_BYTES = 256 << 20  # drop mapped pages every 256 MiB read: RSS stays bounded, few syscalls


def _release(pre: Source, fts: list[Source]) -> None:
    """Resident memory stays bounded: drop the pages of the memory-mapped inputs."""
    pre.release()
    for f in fts:
        f.release()


def _task_metadata(name: str, cfg: StoreConfig, fingerprint: str) -> dict[str, str]:
    return {"format": "tvq_lightning.task", "task": name, "scheme": cfg.label, "pretrained": fingerprint}


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off meanwhile: a full collection of a large heap (torch,
    numba) holds the GIL for ~0.1 s and so stalls the worker threads; the writer makes few cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def quantize_to_store(
    pretrained: WeightsLike,
    finetuned: Mapping[str, WeightsLike],
    out: str | Path,
    config: StoreConfig = StoreConfig(),
    *,
    prefix: str | None = None,
    pretrained_prefix: str | None = None,
    finetuned_prefix: str | None = None,
    allow_pickle: bool = False,
    trust_pickle_code: bool = False,
    overwrite: bool = False,
    rtvq_base: RtvqBaseMode | None = None,
    sensitivity: Mapping[str, float] | None = None,
    allocation: Allocation | None = None,
    progress: bool = True,
) -> Layout:
    """Create the store ``out`` from fine-tuned checkpoints, or add the tasks to an existing one.

    Args:
        pretrained: theta_0, a checkpoint path or a state dict.
        finetuned: task name -> checkpoint path or state dict.
        out: the store directory.
        config: scheme and bits. When ``out`` is an existing store its own config is used and a
            different ``config`` is an error.
        prefix: keep only keys under this prefix (e.g. ``model.encoder.``) in every checkpoint.
        pretrained_prefix: the prefix for theta_0 alone (default: ``prefix``), when its keys are wrapped
            differently from the fine-tuned ones (e.g. ``model.visual.`` in theta_0).
        finetuned_prefix: the prefix for the fine-tuned checkpoints alone (default: ``prefix``).
        allow_pickle: accept checkpoints that are pickled modules (task_vectors' ``finetuned.pt``); they
            load through an allow-list of classes and no code from the file runs.
        trust_pickle_code: unpickle checkpoints with plain ``torch.load``, which RUNS CODE FROM THE FILE
            (needs its classes importable); only for trusted files the allow-list refuses.
        overwrite: replace an existing ``out`` instead of adding to it.
        rtvq_base: adding to a store with a shared file (RTVQ's base), keep it (``frozen``: the
            new offsets are taken against the stored base) or ``recompute`` the base over all
            tasks (old tasks are then re-encoded from their stored reconstruction: one more
            rounding of their offsets). Default (None): frozen when the base was built from two
            or more tasks, recomputed when it was built from one (a one-task base is that task's
            own vector; ``frozen`` is then refused).
        sensitivity: per-key weights for the bit allocator (``config.budget``); recorded in the
            layout's ``allocation`` entry.
        allocation: per-key widths chosen beforehand (e.g. by the ``BitAllocation`` callback),
            used instead of running the allocator; it must name every quantized key. Only for a
            new (or overwritten) store: tasks added to a store take its recorded widths.
    """
    out = Path(out)
    with output_errors(out):
        pickles = {"allow_pickle": allow_pickle, "trust_pickle_code": trust_pickle_code}
        prefixes = (prefix if pretrained_prefix is None else pretrained_prefix,
                    prefix if finetuned_prefix is None else finetuned_prefix)
        return _quantize_to_store(pretrained, finetuned, out, config, prefixes=prefixes, pickles=pickles,
                                  overwrite=overwrite, rtvq_base=rtvq_base, sensitivity=sensitivity,
                                  allocation=allocation, progress=progress)


def _quantize_to_store(pretrained, finetuned, out: Path, config: StoreConfig, *, prefixes, pickles, overwrite,
                       rtvq_base, sensitivity, allocation, progress) -> Layout:
    names = [check_task_name(n) for n in finetuned]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TvqError(f"task {dup!r} is given twice; every task needs its own name")
    if not names:
        raise TvqError("no fine-tuned checkpoints given; pass --finetuned NAME=PATH ...")
    pre = open_source("pretrained", pretrained, prefix=prefixes[0], **pickles)
    pre_keys = floating_keys(pre)
    fts = [open_source(n, finetuned[n], prefix=prefixes[1], **pickles) for n in names]
    for f in fts:
        check_compatible(pre_keys, f, pre)
    if out.exists() and not overwrite:
        if not is_store(out):
            raise OutputExistsError(f"{out} exists and is not a store; it is left untouched: choose another --out")
        if allocation is not None:
            raise QuantConfigError(f"store {out} exists: added tasks take its recorded per-key widths; "
                                   f"drop allocation= or rebuild the store with overwrite=True")
        return _add_tasks(TaskVectorStore(out), pre, fts, config, rtvq_base, progress)
    if allocation is not None:
        _check_allocation(allocation, pre_keys, config)
    elif config.budget is not None:
        allocation = _allocate(pre, fts, pre_keys, config, sensitivity, progress)
    infos = _key_infos(pre_keys, config, allocation)
    with staged_directory(out, overwrite=overwrite, replaceable=is_store, what="store") as tmp:
        (tmp / "tasks").mkdir()
        layout = _write_generation(tmp, pre, fts, infos, config, None, generation=1, show=progress)
        layout = layout.with_(allocation=None if allocation is None else _allocation_record(allocation, sensitivity))
        atomic_write_json(tmp / LAYOUT_FILE, layout.to_json())
    return layout


_PENDING = "tvq1:" + "0" * 64  # same length as the fingerprint that replaces it at close


def _write_generation(root: Path, pre: Source, fts: list[Source], infos: dict[str, KeyInfo], cfg: StoreConfig,
                      fingerprint: str | None, generation: int, show: bool, frozen_base: TaskVectorStore | None = None,
                      keep: Layout | None = None) -> Layout:
    """Encode ``fts`` into new files of ``generation`` under ``root``; returns the new layout.

    ``fingerprint=None``: theta_0's fingerprint is computed during the pass (new stores).
    """
    rel = {f.name: f"tasks/{f.name}.g{generation}.safetensors" for f in fts}
    writers = [_writer(root / rel[f.name], infos, cfg, _task_metadata(f.name, cfg, fingerprint or _PENDING)) for f in fts]
    base_rel = f"base.g{generation}.safetensors"
    base_writer = None
    if cfg.scheme_impl.shared_file and frozen_base is None:
        base_writer = _writer(root / base_rel, infos, cfg, _task_metadata("base", cfg, fingerprint or _PENDING), quantized_only=True)
    all_writers = writers + ([base_writer] if base_writer else [])
    entries = None if fingerprint is not None else {k: tensor_entry(pre.sd[k]) for k in pre.sd.keys() if k not in infos}
    try:
        _encode_all(pre, fts, infos, cfg, writers, base_writer, show, frozen_base, entries)
        if fingerprint is None:
            fingerprint = combine_entries(entries)
            for w in all_writers:
                w.metadata["pretrained"] = fingerprint
        sizes = [w.close() for w in writers]
        base_size = base_writer.close() if base_writer else 0
    except BaseException:
        for w in all_writers:
            w.abort()
        raise
    tasks = dict(keep.tasks) if keep is not None else {}
    tasks.update({f.name: TaskInfo(rel[f.name], f.label, s, w.checksums) for f, s, w in zip(fts, sizes, writers)})
    if base_writer is not None:
        base, base_tasks = TaskInfo(base_rel, "mean of the task vectors", base_size, base_writer.checksums), tuple(tasks)
    elif keep is not None:
        base, base_tasks = keep.base, keep.base_tasks
    else:
        base, base_tasks = None, ()
    return Layout(cfg, fingerprint, infos, tasks, base, base_tasks, generation,
                  keep.allocation if keep else None, keep.extra if keep else {})


def _add_tasks(store: TaskVectorStore, pre: Source, fts: list[Source], config: StoreConfig,
               rtvq_base: RtvqBaseMode, show: bool) -> Layout:
    layout = store.layout
    cfg = layout.config
    if config != cfg and config != StoreConfig():
        raise QuantConfigError(f"store {store.path} holds {cfg.label} task vectors; adding with {config.label} settings is not possible: drop the scheme options or use another --out")
    for f in fts:
        if f.name in layout.tasks:
            raise TvqError(f"task {f.name!r} is already in store {store.path}; choose another name, or rebuild the store with --overwrite")
    infos = layout.keys
    if set(floating_keys(pre)) != set(infos):
        raise TvqError(f"{pre.label} has other keys than store {store.path}; use the same --prefix as when the store was made")
    store.check_pretrained(pre.sd, label=pre.label)
    store.check_layout(pre)
    check_output(store.path / LAYOUT_FILE, True, what="store layout")  # writable, before any work
    for d in (store.path, store.path / "tasks"):
        clean_stale(d)  # temp files of earlier runs that were killed
    mode = cfg.scheme_impl.add_mode(layout, rtvq_base)
    if mode == "recompute":
        return _recompute_shared(store, pre, fts, show)
    frozen = store if mode == "frozen" else None
    new = _write_generation(store.path, pre, fts, infos, cfg, layout.fingerprint, layout.generation, show,
                            frozen_base=frozen, keep=layout)
    new = new.with_(generation=layout.generation)
    try:
        atomic_write_json(store.path / LAYOUT_FILE, new.to_json())
    except BaseException:
        for f in fts:
            (store.path / new.tasks[f.name].file).unlink(missing_ok=True)
        raise
    return new


def _recompute_shared(store: TaskVectorStore, pre: Source, fts: list[Source], show: bool) -> Layout:
    """Re-derive the shared file (RTVQ's base) over old (reconstructed) and new tasks, rewrite every file."""
    layout = store.layout
    old = [Source(t, f"{store.path}:{t}", _Reconstructed(store, t, pre.sd)) for t in layout.tasks]
    gen = layout.generation + 1
    new = _write_generation(store.path, pre, old + fts, layout.keys, layout.config, layout.fingerprint, gen, show)
    new = new.with_(allocation=layout.allocation, extra=layout.extra)
    atomic_write_json(store.path / LAYOUT_FILE, new.to_json())
    for p in {*(t.file for t in layout.tasks.values()), *([layout.base.file] if layout.base else [])}:
        with contextlib.suppress(OSError):
            (store.path / p).unlink()
    return new


class _Reconstructed(Mapping):
    """A stored task as fine-tuned weights: theta_0 + tau_hat, one key at a time."""

    def __init__(self, store: TaskVectorStore, task: str, pre: Mapping[str, torch.Tensor]):
        self.store, self.task, self.pre = store, task, pre

    def __getitem__(self, key: str) -> torch.Tensor:
        p = self.pre[key]
        if key not in self.store.layout.keys:
            return p
        return self.store.task_vector(self.task, key, p).add_(p.float())

    def __iter__(self):
        return iter(self.pre)

    def __len__(self) -> int:
        return len(self.pre)
