"""Every data-free merge of every store, with the method's λ chosen on the validation splits.

Merges go through the streaming engine (``plan_merge`` / ``merge_state_dict``: what ``tvq merge``
runs); per-task methods (EMR) write their artifact like ``tvq merge --out DIR`` and each task's
model is read back from it. The λ-like option of each method (:data:`~.config.MERGE_METHODS`) is
swept over the config's grid on the validation splits with the FP32 store; that value is used
for every store on the test splits.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor

from ..merging.engine import merge_state_dict, plan_merge
from ..merging.output import task_model_tensors, write_per_task
from ..merging.registry import create_merger
from ..store.reader import TaskVectorStore
from .bench import Bench
from .config import MERGE_METHODS
from .evaluate import Evaluator, individual_models, result


def _grid(bench: Bench, option: str | None) -> list:
    if option is None:
        return [None]
    return list(bench.cfg.alpha_grid if option == "alpha" else bench.cfg.scaling_grid)


def merged_models(store: TaskVectorStore, bench: Bench, method: str, options: dict) -> Callable[[str], Mapping[str, Tensor]]:
    """``task -> the model task t uses`` for one merge (one model for all, or one per task)."""
    if not create_merger(method, **options).per_task:
        merged = merge_state_dict(store, bench.pretrained_path, method, **options)
        return lambda task: merged
    with tempfile.TemporaryDirectory(prefix="tvq_demo_merge_") as tmp:
        write_per_task(plan_merge(store, bench.pretrained_path, method, **options), Path(tmp) / "artifact")
        models = {t: dict(task_model_tensors(Path(tmp) / "artifact", t, bench.pretrained_path)[1])
                  for t in bench.tasks}
    return models.__getitem__


def _avg_accuracy(ev: Evaluator, models: Callable[[str], Mapping[str, Tensor]], split: str) -> dict[str, float]:
    per_task = [models(t) for t in ev.bench.tasks]
    if all(m is per_task[0] for m in per_task):      # one model for every task: one batched forward
        return ev.accuracy(per_task[0], split)
    return {t: ev.task_accuracy(m, t, split) for t, m in zip(ev.bench.tasks, per_task)}


def _scaled(unit: Callable[[str], Mapping[str, Tensor]], pre: Mapping[str, Tensor], lam: float):
    """θ0 + λ (unit(t) − θ0): the model at ``scaling = λ`` from the model at ``scaling = 1``."""
    cache: dict[int, dict[str, Tensor]] = {}

    def get(task: str) -> Mapping[str, Tensor]:
        m = unit(task)
        if id(m) not in cache:
            cache[id(m)] = {k: pre[k] + lam * (m[k] - pre[k]) for k in pre}
        return cache[id(m)]

    return get


def merge_method(store: TaskVectorStore, bench: Bench, ev: Evaluator, method: str, value=None) -> dict:
    """The method's test accuracy, at option ``value``, or (``value=None``) at the grid value best
    on the validation splits.

    Every method here ends with ``θ0 + scaling * delta`` (``delta`` independent of ``scaling``), so
    a ``scaling`` sweep merges once at 1 and scales the delta; other options merge per value.
    """
    option = MERGE_METHODS[method]
    if option is None or value is not None:
        models = merged_models(store, bench, method, {} if option is None else {option: value})
        extra = {} if option is None else {"option": option, "value": value}
        return result(_avg_accuracy(ev, models, "test"), **extra)
    pre = bench.pretrained()
    unit = merged_models(store, bench, method, {"scaling": 1.0}) if option == "scaling" else None
    best, sweep = None, {}
    for v in _grid(bench, option):
        models = _scaled(unit, pre, v) if unit is not None else merged_models(store, bench, method, {option: v})
        val = _avg_accuracy(ev, models, "val")
        sweep[str(v)] = score = sum(val.values()) / len(val)
        if best is None or score > best[0]:
            best = (score, v, models)
    _, v, models = best
    return result(_avg_accuracy(ev, models, "test"), option=option, value=v, val_sweep=sweep)


def merge_all(stores: Mapping[str, Path], bench: Bench, ev: Evaluator, progress=None) -> dict[str, dict[str, dict]]:
    """``results[method][scheme]`` for ``individual`` and every data-free method.

    λ (each method's option) is chosen on validation with the FP32 store and reused for every
    quantized store, so the columns of a row differ only by the quantization of τ.
    """
    results: dict[str, dict[str, dict]] = {"individual": {}}
    pre = bench.pretrained()
    order = ["fp32"] + [s for s in stores if s != "fp32"]
    for scheme in order:
        store = TaskVectorStore(stores[scheme])
        results["individual"][scheme] = result(ev.per_task_accuracy(individual_models(store, pre, bench.tasks)))
        methods = MERGE_METHODS if scheme in bench.cfg.all_methods_schemes else ("task_arithmetic",)
        for method in methods:
            chosen = results.get(method, {}).get("fp32", {}).get("value")
            results.setdefault(method, {})[scheme] = merge_method(store, bench, ev, method, chosen)
            if progress is not None:
                progress(f"{scheme}/{method}")
        store.close()
    return results
