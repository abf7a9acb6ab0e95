"""Dense evaluation and every data-free merge of the encoder, with λ chosen on validation.

A model is an encoder state dict (θ0, θ0 + τ̂_t, a merge) plus one decoder per task; a forward is
``head_t(functional_call(encoder, params, images))``, scored by the task type's metric (exact
global per-pixel means; percentage metrics in %). Each task's main metric comes first in its
entry. Δm (:func:`~tvq_lightning.metrics.delta_m`, in %) averages, per task, the two metrics of
:data:`~.config.DELTA_M_METRICS`, then the tasks.

Merges reuse the sweep's streaming-engine helpers (:func:`~tvq_lightning.sweep.core.merged_models`,
a ``scaling`` sweep merged once at 1 and scaled); every merged encoder then gets the BatchNorm
statistics of ``cfg.bn_stats`` (default ``"mean"``: θ0 + mean_t τ̂_t of the store, the experts'
mean). Individual models keep their own statistics (θ0 + τ̂_t). λ (each method's option) is chosen
by Δm on the validation split with the FP32 store and reused for every other store.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from ...merging.bn_stats import bn_stat_keys, store_bn_statistics
from ...metrics import delta_m
from ...store.reader import TaskVectorStore
from ...tasks import create_task_type
from ...sweep.core import individual_models, merged_models, scaled
from .config import DELTA_M_METRICS, DENSE_METHODS
from .finetune import DenseBench

Metrics = dict[str, dict[str, float]]          # task -> metric -> value
Models = Callable[[str], Mapping[str, Tensor]]  # task -> encoder state dict


class DenseEvaluator:
    def __init__(self, bench: DenseBench):
        self.bench = bench
        self.encoder = bench.encoder().eval()
        self.types = {t: create_task_type(t) for t in bench.tasks}
        self.bn_keys = bn_stat_keys(self.encoder)
        dm = bench.datamodule()
        self.data = {s: {t: dm.split(t, s).tensors for t in bench.tasks} for s in ("val", "test")}

    def _forward(self, params: Mapping[str, Tensor], images: Tensor) -> list[Tensor]:
        outs = [functional_call(self.encoder, dict(params), (x,)) for x in images.split(256)]
        return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]

    @torch.no_grad()
    def metrics(self, models: Models, split: str = "test", heads: Mapping[str, torch.nn.Module] | None = None,
                keep: int = 0) -> tuple[Metrics, dict[str, Tensor]]:
        """``{task: {metric: value}}`` (main metric first) and, with ``keep``, the first ``keep``
        predictions per task (the task type's ``predict``)."""
        heads = heads or self.bench.heads
        out: Metrics = {}
        preds: dict[str, Tensor] = {}
        feats_of: dict[int, list[Tensor]] = {}
        for t in self.bench.tasks:
            images, target = self.data[split][t]
            params = models(t)
            if id(params) not in feats_of:      # one encoder pass per distinct model (tasks share images)
                feats_of[id(params)] = self._forward(params, images)
            feats = feats_of[id(params)]
            tt, head = self.types[t], heads[t].eval()
            logits = torch.cat([head([f[i:i + 256] for f in feats]) for i in range(0, len(images), 256)])
            metric = tt.make_metric(int(logits.shape[1]), sync_on_compute=False)
            metric.update(logits, target)
            values = metric.compute()
            out[t] = {i.name: float(values[tt.metric_keys[i.name]]) * (100.0 if i.percent else 1.0)
                      for i in tt.metric_infos}
            if keep:
                preds[t] = tt.predict(logits[:keep])
        return out, preds

    def delta_m(self, results: Metrics, baseline: Metrics) -> float:
        # a metric whose baseline is 0 (e.g. no pixel under 11.25° after a tiny fine-tune) has no
        # relative change: the task's other metric counts alone
        names = {t: [m for m in DELTA_M_METRICS[t] if baseline[t][m] != 0] or list(DELTA_M_METRICS[t][:1])
                 for t in self.bench.tasks}
        return float(delta_m(results, baseline, {t: self.types[t] for t in self.bench.tasks}, metrics=names,
                             average="tasks"))


def cell(results: Metrics, ev: DenseEvaluator, baseline: Metrics, **extra) -> dict:
    """A report cell: ``{"delta_m", "per_task", ...}``."""
    return {"delta_m": ev.delta_m(results, baseline), "per_task": results, **extra}


def with_bn(models: Models, bn: Mapping[str, Tensor] | None) -> Models:
    """``models`` with the BatchNorm statistics ``bn`` (one dict per distinct model)."""
    if not bn:
        return models
    cache: dict[int, dict[str, Tensor]] = {}

    def get(task: str) -> Mapping[str, Tensor]:
        m = models(task)
        if id(m) not in cache:
            cache[id(m)] = {**m, **bn}
        return cache[id(m)]

    return get


def bn_policy_stats(ev: DenseEvaluator, store: TaskVectorStore) -> dict[str, Tensor] | None:
    return store_bn_statistics(ev.bench.cfg.bn_stats, ev.bn_keys, ev.bench.pretrained(), store, ev.bench.tasks)


def method_models(store: TaskVectorStore, ev: DenseEvaluator, method: str, value=None) -> Callable[[float | None], Models]:
    """``value -> models`` of one method on ``store`` (a scaling sweep merges once at 1)."""
    bench, option = ev.bench, DENSE_METHODS[method]
    bn = bn_policy_stats(ev, store)
    if option == "scaling":
        unit = merged_models(store, bench.pretrained_path, bench.tasks, method, {"scaling": 1.0})
        pre = bench.pretrained()
        return lambda v: with_bn(scaled(unit, pre, v), bn)
    if option is None:
        m = with_bn(merged_models(store, bench.pretrained_path, bench.tasks, method, {}), bn)
        return lambda v: m
    return lambda v: with_bn(merged_models(store, bench.pretrained_path, bench.tasks, method, {option: v}), bn)


def merge_method(store: TaskVectorStore, ev: DenseEvaluator, method: str, base: dict[str, Metrics],
                 value=None, keep: int = 0) -> tuple[dict, dict[str, Tensor]]:
    """The method's test cell at option ``value`` or (None) at the grid value best by validation Δm.
    ``base``: the FP32 individual models' ``{"val": ..., "test": ...}`` metrics."""
    option, cfg = DENSE_METHODS[method], ev.bench.cfg
    build = method_models(store, ev, method)
    extra: dict = {}
    if option is not None:
        if value is None:
            grid = cfg.alpha_grid if option == "alpha" else cfg.scaling_grid
            sweep = {v: ev.delta_m(ev.metrics(build(v), "val")[0], base["val"]) for v in grid}
            value = max(grid, key=lambda v: sweep[v])
            extra["val_sweep"] = {str(v): s for v, s in sweep.items()}
        extra.update(option=option, value=value)
    res, preds = ev.metrics(build(value), "test", keep=keep)
    return cell(res, ev, base["test"], **extra), preds


def merge_all(stores: Mapping[str, Path], ev: DenseEvaluator, progress=None) -> tuple[dict, dict, dict]:
    """``(results[method][scheme], the FP32 individual models' val/test metrics, pictures)``.

    Rows: ``individual`` (θ0 + τ̂_t, own statistics, task t's decoder), ``pretrained_decoders``
    (θ0's encoder with the fine-tuned decoders: λ = 0), and every data-free method (merged encoder,
    ``cfg.bn_stats`` statistics); BitDelta gets individual + task arithmetic only."""
    bench, cfg = ev.bench, ev.bench.cfg
    keep = cfg.picture_rows
    pre = bench.pretrained()
    results: dict[str, dict] = {"individual": {}}
    pictures: dict[str, dict[str, Tensor]] = {}
    base: dict[str, Metrics] = {}
    order = ["fp32"] + [s for s in stores if s != "fp32"]
    for scheme in order:
        store = TaskVectorStore(stores[scheme])
        ind = individual_models(store, pre, bench.tasks)
        if scheme == "fp32":
            base["val"] = ev.metrics(ind.__getitem__, "val")[0]
        res, preds = ev.metrics(ind.__getitem__, "test", keep=keep)
        if scheme == "fp32":
            base["test"] = res
            pictures["individual"] = preds
            p0, _ = ev.metrics(lambda t: pre, "test")
            results["pretrained_decoders"] = {"fp32": cell(p0, ev, base["test"], option="scaling", value=0.0)}
        elif scheme == "tvq2":
            pictures["tvq2"] = preds
        results["individual"][scheme] = cell(res, ev, base["test"])
        methods = [m for m in cfg.methods if scheme in cfg.all_methods_schemes or m == "task_arithmetic"]
        for method in methods:
            chosen = results.get(method, {}).get("fp32", {}).get("value")
            c, preds = merge_method(store, ev, method, base, chosen, keep if method == "task_arithmetic" else 0)
            if method == "task_arithmetic" and scheme == "fp32":
                pictures["task_arithmetic"] = preds
            results.setdefault(method, {})[scheme] = c
            if progress is not None:
                progress(f"{scheme}/{method}")
        store.close()
    # task arithmetic against θ0 with the trained decoders as well
    ta = results.get("task_arithmetic", {}).get("fp32")
    if ta is not None:
        ta["delta_m_vs_pretrained_decoders"] = ev.delta_m(ta["per_task"], results["pretrained_decoders"]["fp32"]["per_task"])
    return results, base, pictures
