"""``tvq demo``: the whole system on the embedded benchmark, and the TVQ paper's findings.

Phases (each timed in ``report.json``):

1. ``setup``: generate (or load the cached) task data, load the shipped pre-trained tiny CLIP (θ0),
   build every task's zero-shot head from class names and templates, and compute the frozen
   stem's features once;
2. ``finetune``: one ``Trainer.fit`` per task of the image tower's top, with ``QuantizeOnSave``
   writing the FP32 and TVQ-INT4 stores (the fine-tuned weights are never saved);
3. ``stores``: FQ-INT8/4, TVQ-INT8/3/2, RTVQ B3O2 and the budget store (``--budget 2.5``,
   per-tensor widths) from the FP32 store's exact task vectors; bytes on disk, reconstruction
   errors, the range ratio;
4. ``merge``: individual models and task arithmetic on every store, every data-free method on
   ``DemoConfig.all_methods_schemes``; λ chosen on validation with the FP32 store;
5. ``adapt``: AdaMerging (task- and layer-wise) and Model Tinting++ on the FP32 store
   (``DemoConfig.adapt_runs``; the quick variant also adapts on the TVQ-INT4 store);
6. ``report``: ``report.md``, ``report.json`` and the plots in ``--out`` (default ``runs/demo``).

The output folder is built next to ``--out`` and swapped in when complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .config import SCHEMES, DemoConfig
from .timing import PhaseTimer

__all__ = ["SCHEMES", "SUITES", "DemoConfig", "run_demo"]


@contextlib.contextmanager
def _quiet_lightning():
    """The demo prints its own progress: silence Lightning's per-Trainer banners and tips."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*(LeafSpec|eval mode|num_workers|does not have many workers).*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _bar(items, desc: str, show: bool):
    return tqdm(items, desc=desc, disable=not show, file=sys.stderr, leave=True, dynamic_ncols=True)


SUITES = ("all", "classification", "dense")


def is_demo_output(path: Path) -> bool:
    """Whether directory ``path`` is one ``tvq demo`` wrote (it holds the demo's ``report.json``)
    or is empty: only those are replaced by a new run, anything else is refused."""
    try:
        if not any(path.iterdir()):
            return True
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "timings" in report and "machine" in report


def run_demo(out: str | Path = "runs/demo", quick: bool = False, cfg: DemoConfig | None = None,
             clip_dir: str | Path | None = None, progress: bool = True, suite: str = "all",
             dense_cfg=None) -> dict:
    """Run every phase of ``suite`` (``all``: classification, then the dense part of
    :mod:`.dense` into ``report["dense"]``; ``dense_cfg``: a
    :class:`~.dense.DenseDemoConfig`, default its ``quick()`` with ``quick``); returns the report
    (also written to ``out``)."""
    from ..errors import TvqError
    from ..store.io import staged_directory

    if suite not in SUITES:
        raise TvqError(f"suite={suite!r}: choose one of {', '.join(SUITES)}")
    cfg = cfg or (DemoConfig.quick() if quick else DemoConfig())
    out = Path(out)
    with _quiet_lightning(), staged_directory(out, overwrite=True, replaceable=is_demo_output,
                                                          what="demo output") as stage:
        from .report import machine, write_report

        if suite == "dense":
            report = {"timings": {"total": 0.0}, "machine": machine()}
        else:
            report = _run(cfg, stage, clip_dir, progress)
        if suite != "classification":
            from .dense import DenseDemoConfig, run_dense

            dcfg = dense_cfg or (DenseDemoConfig.quick() if quick else DenseDemoConfig())
            report["dense"] = run_dense(dcfg, stage / "dense", progress)
            report["timings"]["dense"] = report["dense"]["timings"]["total"]
            report["timings"]["total"] = report["timings"].get("total", 0.0) + report["timings"]["dense"]
        md = write_report(report, stage)
    print(md)
    return json.loads((out / "report.json").read_text())


def _run(cfg: DemoConfig, out: Path, clip_dir, show: bool) -> dict:
    from dataclasses import asdict

    from ..store.reader import TaskVectorStore
    from .adapt import ADAPTIVE, adapt
    from .bench import prepare
    from .evaluate import (
        Evaluator,
        quantization_error,
        range_ratio,
        storage_entry,
        task_vector_cosine,
    )
    from .finetune import build_joint_stores, finetune_task
    from ..sweep.backends import EmbeddedBackend
    from ..sweep.core import MERGE_METHODS, result, run_cells
    from .report import machine

    timer = PhaseTimer()
    timings, lap = timer.timings, timer.lap

    bar = _bar(cfg.tasks, "setup: data, θ0, zero-shot heads, stem features", show)
    bench = prepare(cfg, out, clip_dir, progress=lambda _: bar.update(1))
    bar.close()
    ev = Evaluator(bench)
    results: dict[str, dict] = {"pretrained": {"fp32": result(ev.accuracy(bench.pretrained()))}}
    lap("setup")

    stores = {s: out / "stores" / s for s in cfg.schemes}
    for task in _bar(cfg.tasks, "finetune (QuantizeOnSave)", show):
        finetune_task(bench, task, stores)
    lap("finetune")

    build_joint_stores(bench, stores)
    exact = TaskVectorStore(stores["fp32"])
    storage, diagnostics = {}, {}
    for s, path in stores.items():
        st = TaskVectorStore(path)
        storage[s] = storage_entry(st)
        alloc = st.layout.allocation
        if alloc:
            storage[s]["allocation"] = {k: alloc[k] for k in ("bits", "base_bits", "offset_bits") if k in alloc}
            storage[s]["allocation"]["sensitivity"] = "grad2" if alloc.get("sensitivity") else "uniform"
        diagnostics[s] = {"rel_l2_error": quantization_error(st, exact, bench.pretrained(), bench.tasks)}
        st.close()
    quantized = TaskVectorStore(stores["tvq4" if "tvq4" in stores else next(s for s in stores if s != "fp32")])
    qkeys = [k for k in quantized.keys if quantized.layout.keys[k].quantized]
    diagnostics["range_ratio"] = range_ratio(exact, bench.pretrained(), bench.tasks, qkeys)
    diagnostics["task_vector_cosine"] = task_vector_cosine(exact, bench.tasks, qkeys)
    lap("stores")

    full = [s for s in stores if s in cfg.all_methods_schemes]
    bar = _bar(range(len(full) * len(MERGE_METHODS) + len(stores) - len(full)), "merge (λ on validation)", show)
    results.update(run_cells(stores, EmbeddedBackend(bench, ev), cfg.plan(), progress=lambda _: bar.update(1)))
    bar.close()
    analysis = {"task_arithmetic_loss": _ta_loss(bench, ev, exact, results)}
    lap("merge")

    runs = [(m, s) for m, s in cfg.adapt_runs if s in stores and m in ADAPTIVE]
    for method, scheme in _bar(runs, "adapt (AdaMerging, Tinting++)", show):
        results.setdefault(method, {})[scheme] = adapt(method, bench, stores[scheme], out / "adapt" / scheme)
    lap("adapt")
    exact.close()
    timer.finish()
    return {"tasks": bench.tasks, "results": results, "storage": storage, "diagnostics": diagnostics,
            "analysis": analysis, "timings": timings, "config": asdict(cfg), "machine": machine()}


def _ta_loss(bench, ev, exact, results) -> dict:
    """Where task arithmetic loses accuracy at its validation λ: each task's own scaled vector alone
    (under-scaling) vs the sum of all (interference)."""
    from ..sweep.core import individual_models

    lam = results["task_arithmetic"]["fp32"]["value"]
    own = ev.per_task_accuracy(individual_models(exact, bench.pretrained(), bench.tasks, scale=lam))
    return {"scaling": lam, "own_vector": sum(own.values()) / len(own),
            "merged": results["task_arithmetic"]["fp32"]["avg"], "individual": results["individual"]["fp32"]["avg"]}
