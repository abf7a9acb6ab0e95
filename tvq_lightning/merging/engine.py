"""Streaming execution of a merge: key by key, memory independent of the number of tasks' models.

For each key the engine reads theta_0's tensor and every task's packed codes, dequantizes them
on the merge device, lets the method merge them, writes the result, and frees everything before
the next key. Methods with global statistics get their own streaming passes first
(:attr:`Merger.passes`), which also see one key at a time. Peak memory is theta_0's mapping
(memory-mapped, not resident), one key's T task vectors, and the output writer's buffers.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import OptionError, StoreError, TvqError
from ..quant.kernels import parallel_map
from ..store.reader import TaskVectorStore
from ..store.sources import Source, WeightsLike, open_source
from .base import KeyInput, Merger, PerTaskDelta
from .blocks import detect_blocks
from .fused import pack_key
from .registry import check_config, create_merger


@dataclass
class MergePlan:
    """A resolved merge: the store, theta_0, the tasks and the method."""

    store: TaskVectorStore
    pretrained: Source
    merger: Merger
    tasks: list[str]
    device: torch.device
    blocks: dict[str, int] = field(default_factory=dict)
    depth: int = 0
    progress: bool = False

    def release(self) -> None:
        """Drop resident pages of the memory-mapped inputs: memory stays one key's worth."""
        self.pretrained.release()
        self.store.release()

    def key_input(self, key: str, with_levels: bool = False) -> KeyInput:
        p = self.pretrained.sd[key]
        info = self.store.layout.keys[key]
        dev = self.device

        def levels():
            impl, cfg = self.store.scheme_impl, self.store.config
            shared = self.store.shared_parts(key)
            lv = parallel_map(lambda t: impl.levels(cfg, info, self.store.parts(t, key), shared), self.tasks)
            return lv if any(x is not None for x in lv) else None

        def taus() -> list[Tensor]:
            return [t.to(dev) for t in self.store.task_vectors(key, self.tasks, p)]

        def packed():
            scheme = self.store.scheme
            if dev.type != "cpu" or not info.quantized or scheme not in ("tvq", "rtvq"):
                return None
            base = self.store.base_qtensor(key) if scheme == "rtvq" else None
            if scheme == "rtvq" and base is None:
                return None
            return pack_key([self.store.qtensor(t, key) for t in self.tasks], tuple(info.shape), base)

        return KeyInput(key, p.to(dev, torch.float32), taus, self.tasks, self.blocks.get(key), self.depth,
                        info.quantized, levels if with_levels and info.quantized else None, packed)


def plan_merge(store: str | Path | TaskVectorStore, pretrained: WeightsLike, method: str | Merger, *,
               tasks: Sequence[str] | None = None, device: str | torch.device = "cpu", prefix: str | None = None,
               allow_pickle: bool = False, trust_pickle_code: bool = False, progress: bool = False, verify: bool = True,
               **options: Any) -> MergePlan:
    """Open and check everything a merge needs; raises before any output is written.

    theta_0 must be the store's (fingerprint), and the layout's keys, shapes and dtypes theta_0's
    (checked before anything is allocated). ``verify=False`` skips the checksums of the stored
    tensors (a trusted store; see :class:`~tvq_lightning.store.TaskVectorStore`).
    """
    merger = method if isinstance(method, Merger) else create_merger(method, **options)
    if options and isinstance(method, Merger):
        raise TvqError("pass options either to create_merger or here, not both")
    check_config(merger.name, merger.config)
    if isinstance(tasks, str):
        raise OptionError(f"tasks={tasks!r} is a string: pass a list of task names (e.g. tasks=[{tasks!r}])")
    if tasks is not None:
        tasks = list(tasks)
        dup = next((t for i, t in enumerate(tasks) if t in tasks[:i]), None)
        if dup is not None:
            raise OptionError(f"task {dup!r} is given twice in --tasks; name each task once")
    store = store if isinstance(store, TaskVectorStore) else TaskVectorStore(store, verify=verify)
    if not verify:
        store.verify = False
    pre = open_source("pretrained", pretrained, prefix=prefix, allow_pickle=allow_pickle, trust_pickle_code=trust_pickle_code)
    store.check_pretrained(pre.sd, label=pre.label)
    store.check_layout(pre)
    tasks = list(store.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in store.layout.tasks]
    if unknown:
        raise StoreError(f"store {store.path} has no task {unknown[0]!r}; it has: {', '.join(store.tasks)}")
    if not tasks:
        raise StoreError(f"store {store.path} holds no tasks to merge")
    blocks, depth = detect_blocks(store.keys)
    return MergePlan(store, pre, merger, tasks, torch.device(device), blocks, depth, progress)


def run_passes(plan: MergePlan) -> None:
    """The method's statistics passes (each sees every stored key once)."""
    m = plan.merger
    for i in range(m.passes):
        m.begin(plan.tasks, i)
        for key in tqdm(plan.store.keys, desc=f"{m.name}: statistics {i + 1}/{m.passes}", disable=not plan.progress, leave=False):
            m.observe(plan.key_input(key, with_levels=True), i)
            plan.release()
        m.end(i)


def iter_merged(plan: MergePlan) -> Iterator[tuple[str, Tensor | PerTaskDelta, Tensor]]:
    """``(key, merged, theta_0's tensor)`` for every key of theta_0, after the statistics passes.

    ``merged`` is the merged weight (theta_0's dtype, on the merge device) for single-model
    methods, or the :class:`PerTaskDelta` for per-task methods; keys the store does not hold
    (integer buffers, keys no task changed) come back as theta_0's tensor.
    """
    run_passes(plan)
    deferred: list[str] = []
    layout_keys = plan.store.layout.keys
    for key in tqdm(list(plan.pretrained.sd.keys()), desc=f"{plan.merger.name}: merging", disable=not plan.progress, leave=False):
        p = plan.pretrained.sd[key]
        if key not in layout_keys:
            yield key, p, p
            continue
        inp = plan.key_input(key)
        delta = plan.merger.merge_key(inp)
        if delta is None:  # needs a statistic of the merge pass itself (TIES' majority sign): redo at the end
            deferred.append(key)
            continue
        yield key, _apply(delta, inp, p), p
        plan.release()
    for key in deferred:  # rebuilt from the store: only the key's name was kept
        p = plan.pretrained.sd[key]
        inp = plan.key_input(key)
        yield key, _apply(plan.merger.merge_key(inp, final=True), inp, p), p
        plan.release()


def _apply(delta: Tensor | PerTaskDelta, inp: KeyInput, p: Tensor) -> Tensor | PerTaskDelta:
    if isinstance(delta, PerTaskDelta):
        return delta
    return delta.add_(inp.pretrained).to(p.dtype)


def merge_state_dict(store, pretrained, method: str | Merger, *, tasks=None, device="cpu", **options) -> dict[str, Tensor]:
    """The merged model as an in-memory state dict (single-model methods)."""
    plan = plan_merge(store, pretrained, method, tasks=tasks, device=device, **options)
    if plan.merger.per_task:
        raise TvqError(f"{plan.merger.name} gives one model per task; use merge_per_task() or `tvq merge --out DIR`")
    merged = {k: v for k, v, _ in iter_merged(plan)}
    return {k: merged[k] for k in plan.pretrained.sd.keys()}  # theta_0's key order
