"""The dense part of ``tvq demo`` (``--suite dense``): the TVQ pipeline on rendered scenes.

Phases (each timed in ``report.json["dense"]["timings"]``):

1. ``setup``: θ0 (the shipped ``tu-resnet10t`` scene encoder), the rendered splits of
   :class:`~tvq_lightning.data.scenes.SceneTasks` (segmentation, depth, normal);
2. ``finetune``: one ``Trainer.fit`` per task (encoder + UNet decoder) with ``QuantizeOnSave``
   writing the FP32 and TVQ-INT4 stores of the encoder's task vectors; decoders saved per task;
3. ``stores``: TVQ-INT2, RTVQ B3O2 and BitDelta from the FP32 store; bytes, reconstruction errors;
4. ``merge``: individual models, θ0 + trained decoders, every data-free method on the encoder
   (BatchNorm statistics: the experts' mean), λ chosen on validation with the FP32 store;
5. ``adapt``: layer-wise AdaMerging and Model Tinting (tinted decoders) on the FP32 store;
6. ``report``: findings, ``dense_delta_m.png`` and one picture grid per task.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .config import DENSE_METHODS, DENSE_SCHEMES, DenseDemoConfig
from ..timing import PhaseTimer

__all__ = ["DENSE_METHODS", "DENSE_SCHEMES", "DenseDemoConfig", "run_dense"]


def _bar(items, desc: str, show: bool):
    return tqdm(items, desc=f"dense {desc}", disable=not show, file=sys.stderr, leave=True, dynamic_ncols=True)


def run_dense(cfg: DenseDemoConfig, out: Path, show: bool = True) -> dict:
    """Every phase of the dense demo in ``out``; returns the report's ``"dense"`` section."""
    import torch

    from ...store.reader import TaskVectorStore
    from ..config import SCHEMES
    from ..evaluate import quantization_error, range_ratio, storage_entry, task_vector_cosine
    from ..finetune import build_joint_stores
    from .adapt import ADAPTIVE, adapt
    from .evaluate import DenseEvaluator, merge_all
    from .finetune import finetune_task, prepare
    from .report import delta_m_plot, findings, picture_grids

    out = Path(out)
    timer = PhaseTimer()
    timings, lap = timer.timings, timer.lap

    torch.manual_seed(cfg.seed)
    bench = prepare(cfg, out)
    lap("setup")

    stores = {s: out / "stores" / s for s in cfg.schemes}
    for task in _bar(cfg.tasks, "finetune (QuantizeOnSave)", show):
        finetune_task(bench, task, stores)
    lap("finetune")

    build_joint_stores(bench, {s: p for s, p in stores.items() if s in SCHEMES})
    exact = TaskVectorStore(stores["fp32"])
    pre = bench.pretrained()
    storage, diagnostics = {}, {}
    for s, path in stores.items():
        st = TaskVectorStore(path)
        storage[s] = storage_entry(st)
        diagnostics[s] = {"rel_l2_error": quantization_error(st, exact, pre, bench.tasks)}
        st.close()
    ref = TaskVectorStore(stores["tvq4" if "tvq4" in stores else "fp32"])
    qkeys = [k for k in ref.keys if ref.layout.keys[k].quantized] or [k for k in exact.keys if exact.layout.keys[k].quantized]
    ref.close()
    diagnostics["range_ratio"] = range_ratio(exact, pre, bench.tasks, qkeys)
    diagnostics["task_vector_cosine"] = task_vector_cosine(exact, bench.tasks, qkeys)
    exact.close()
    lap("stores")

    ev = DenseEvaluator(bench)
    n_full = sum(1 for s in stores if s in cfg.all_methods_schemes)
    bar = _bar(range(n_full * len(cfg.methods) + len(stores) - n_full), "merge (λ on validation)", show)
    results, base, pictures = merge_all(stores, ev, progress=lambda _: bar.update(1))
    bar.close()
    lap("merge")

    lam = results.get("task_arithmetic", {}).get("fp32", {}).get("value") or 0.3
    runs = [(m, s) for m, s in cfg.adapt_runs if s in stores and m in ADAPTIVE]
    for method, scheme in _bar(runs, "adapt (AdaMerging, Model Tinting)", show):
        c, preds = adapt(method, ev, stores[scheme], out / "adapt" / scheme, base["test"], lam,
                         keep=cfg.picture_rows if scheme == "fp32" else 0)
        results.setdefault(method, {})[scheme] = c
        if preds:
            pictures["adapted"] = preds   # the last run shown (Model Tinting when it runs)
    lap("adapt")

    section = {"tasks": bench.tasks, "results": results, "storage": storage, "diagnostics": diagnostics,
               "bn_stats": cfg.bn_stats, "timings": timings, "config": asdict(cfg)}
    section["findings"] = findings(section)
    images = ev.data["test"][bench.tasks[0]][0][:cfg.picture_rows]
    targets = {t: ev.data["test"][t][1][:cfg.picture_rows] for t in bench.tasks}
    rows = {"individual": pictures.get("individual", {}), "task arithmetic": pictures.get("task_arithmetic", {}),
            "TVQ-INT2": pictures.get("tvq2", {}), "adapted": pictures.get("adapted", {})}
    delta_m_plot(section, out)
    picture_grids(bench.tasks, images, targets, rows, out)
    lap("report")
    timer.finish()
    return section
