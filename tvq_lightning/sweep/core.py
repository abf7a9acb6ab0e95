"""The sweep's core: individual models and every data-free method on every store, each method's
option chosen on the validation splits with the reference (FP32) store and reused on every other
store, so the columns of a row differ only by the quantization of τ.

What is evaluated, and how, is the backend's business (:class:`Backend`): the embedded benchmark's
cached features (:class:`~.backends.EmbeddedBackend`, the demo) or a real encoder with its heads and
datasets through a Lightning ``Trainer`` (:class:`~.backends.ModelBackend`). Merges go through the
streaming engine (what ``tvq merge`` runs); per-task methods (EMR, TALL) are written as a per-task
artifact and each task's model read back from it.

Cells are cached one JSON file each (:class:`CellCache`), keyed on the store's content and the
cell's settings, so an interrupted sweep resumes where it stopped and a changed store or grid is
recomputed.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from torch import Tensor

from ..merging.engine import merge_state_dict, plan_merge
from ..merging.output import task_model_tensors, write_per_task
from ..merging.registry import create_merger
from ..store.io import atomic_write_json
from ..store.layout import LAYOUT_FILE
from ..store.reader import TaskVectorStore

Models = Callable[[str], Mapping[str, Tensor]]

#: the data-free merging methods a sweep runs by default, and the option swept on validation
#: (None: the method's defaults)
MERGE_METHODS: dict[str, str | None] = {
    "task_arithmetic": "scaling", "ties": "scaling", "emr": None, "consensus": "scaling", "lines": "alpha",
    "magmax": "scaling", "breadcrumbs": "scaling",
}


class Backend(Protocol):
    """What a sweep evaluates models with."""

    tasks: list[str]
    pretrained_path: Path        # θ0 of the merged keys (the file the stores are fingerprinted against)

    def pretrained(self) -> dict[str, Tensor]:
        """θ0 as a state dict (the keys the stores hold, at least)."""

    def evaluate(self, models: Models, split: str) -> dict[str, float]:
        """``{task: main metric (%)}`` of task t's model ``models(t)`` on split ``split`` (val / test)."""


@dataclass(frozen=True)
class SweepPlan:
    """Which cells a sweep computes."""

    methods: Mapping[str, str | None] = field(default_factory=lambda: dict(MERGE_METHODS))
    all_methods_schemes: tuple[str, ...] = ("fp32", "tvq4", "tvq2", "rtvq_b3o2")   # others: task arithmetic only
    scaling_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    alpha_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    reference: str = "fp32"     # the store each method's option is chosen with

    def grid(self, option: str | None) -> list:
        if option is None:
            return [None]
        return list(self.alpha_grid if option == "alpha" else self.scaling_grid)


def merged_models(store: TaskVectorStore, pretrained: Path | Mapping[str, Tensor], tasks: Sequence[str],
                  method: str, options: dict) -> Models:
    """``task -> the model task t uses`` for one merge (one model for all, or one per task)."""
    if not create_merger(method, **options).per_task:
        merged = merge_state_dict(store, pretrained, method, tasks=list(tasks), **options)
        return lambda task: merged
    with tempfile.TemporaryDirectory(prefix="tvq_sweep_merge_") as tmp:
        write_per_task(plan_merge(store, pretrained, method, tasks=list(tasks), **options), Path(tmp) / "artifact")
        models = {t: dict(task_model_tensors(Path(tmp) / "artifact", t, pretrained)[1]) for t in tasks}
    return models.__getitem__


def scaled(unit: Models, pre: Mapping[str, Tensor], lam: float) -> Models:
    """θ0 + λ (unit(t) − θ0): the model at ``scaling = λ`` from the model at ``scaling = 1``."""
    cache: dict[int, dict[str, Tensor]] = {}

    def get(task: str) -> Mapping[str, Tensor]:
        m = unit(task)
        if id(m) not in cache:
            cache[id(m)] = {k: pre[k] + lam * (m[k] - pre[k]) for k in pre}
        return cache[id(m)]

    return get


def individual_models(store: TaskVectorStore, pretrained: Mapping[str, Tensor], tasks: Sequence[str],
                      scale: float = 1.0) -> dict[str, dict[str, Tensor]]:
    """``{t: θ0 + scale * τ̂_t}`` from the store (dequantized)."""
    out = {}
    for t in tasks:
        params = dict(pretrained)
        for k in store.keys:
            params[k] = pretrained[k] + scale * store.task_vector(t, k, pretrained[k]).to(pretrained[k].dtype)
        out[t] = params
    return out


def result(per_task: Mapping[str, float], **extra) -> dict:
    """A table cell: ``{"avg", "per_task", ...}``."""
    vals = list(per_task.values())
    return {"avg": sum(vals) / max(len(vals), 1), "per_task": dict(per_task), **extra}


def method_cell(store: TaskVectorStore, backend: Backend, plan: SweepPlan, method: str, value=None) -> dict:
    """The method's test cell at option ``value``, or (``value=None``) at the grid value best on the
    validation splits.

    Every method here ends with ``θ0 + scaling * delta`` (``delta`` independent of ``scaling``), so
    a ``scaling`` sweep merges once at 1 and scales the delta; other options merge per value.
    """
    option, tasks, pre_path = plan.methods[method], backend.tasks, backend.pretrained_path
    if option is None or value is not None:
        models = merged_models(store, pre_path, tasks, method, {} if option is None else {option: value})
        extra = {} if option is None else {"option": option, "value": value}
        return result(backend.evaluate(models, "test"), **extra)
    pre = backend.pretrained()
    unit = merged_models(store, pre_path, tasks, method, {"scaling": 1.0}) if option == "scaling" else None
    best, sweep = None, {}
    for v in plan.grid(option):
        models = scaled(unit, pre, v) if unit is not None else merged_models(store, pre_path, tasks, method, {option: v})
        val = backend.evaluate(models, "val")
        sweep[str(v)] = score = sum(val.values()) / len(val)
        if best is None or score > best[0]:
            best = (score, v, models)
    _, v, models = best
    return result(backend.evaluate(models, "test"), option=option, value=v, val_sweep=sweep)


def store_digest(path: Path) -> str:
    """A short hash of a store's layout file (it records every stored tensor's checksum)."""
    return hashlib.sha256((Path(path) / LAYOUT_FILE).read_bytes()).hexdigest()[:16]


class CellCache:
    """One JSON file per cell under ``root``; a cell is reused only when its key matches."""

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root)

    def _path(self, method: str, scheme: str) -> Path:
        return self.root / f"{method}.{scheme}.json"

    def get(self, method: str, scheme: str, key: dict) -> dict | None:
        if self.root is None:
            return None
        try:
            saved = json.loads(self._path(method, scheme).read_text())
        except (OSError, ValueError):
            return None
        return saved.get("cell") if isinstance(saved, dict) and saved.get("key") == key else None

    def put(self, method: str, scheme: str, key: dict, cell: dict) -> None:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._path(method, scheme), {"key": key, "cell": cell})


def run_cells(stores: Mapping[str, Path], backend: Backend, plan: SweepPlan, cache: CellCache | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, dict[str, dict]]:
    """``results[method][scheme]`` for ``individual`` and every method of ``plan``.

    The reference store comes first; each method's option chosen there is reused for every other
    store. Cells found in ``cache`` (same store content, tasks, grid and value) are not recomputed.
    """
    cache = cache or CellCache(None)
    if plan.reference not in stores:
        from ..errors import TvqError

        raise TvqError(f"the sweep chooses options on the {plan.reference!r} store, which is not among the schemes "
                       f"({', '.join(stores)}); add it")
    results: dict[str, dict[str, dict]] = {"individual": {}}
    pre = None
    order = [plan.reference] + [s for s in stores if s != plan.reference]
    for scheme in order:
        digest = store_digest(stores[scheme])
        store = None
        todo = [m for m in plan.methods if scheme in plan.all_methods_schemes or m == "task_arithmetic"]
        for method in ["individual", *todo]:
            chosen = None if method == "individual" else results.get(method, {}).get(plan.reference, {}).get("value")
            grid = [] if method == "individual" else plan.grid(plan.methods[method])
            key = {"store": digest, "tasks": list(backend.tasks), "grid": grid, "value": chosen}
            cell = cache.get(method, scheme, key)
            if cell is None:
                store = store or TaskVectorStore(stores[scheme])
                if method == "individual":
                    pre = pre if pre is not None else backend.pretrained()
                    ind = individual_models(store, pre, backend.tasks)
                    cell = result(backend.evaluate(ind.__getitem__, "test"))
                else:
                    cell = method_cell(store, backend, plan, method, chosen)
                cache.put(method, scheme, key, cell)
            results.setdefault(method, {})[scheme] = cell
            if progress is not None and method != "individual":
                progress(f"{scheme}/{method}")
        if store is not None:
            store.close()
    return results
