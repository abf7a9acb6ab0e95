"""A per-task results table, written when testing ends: ``report.md``, ``report.json``, ``report.png``.

Multi-task modules log one value per task as ``<stage>/<metric>/<task>`` plus the average as
``<stage>/<metric>/avg`` (e.g. ``test/acc/cars``, ``test/acc/avg``). The metric names are the
module's (``pl_module.metric_names``: its task types' metrics; ``acc`` for classification) unless
given. :class:`MultiTaskReport` collects them from ``trainer.callback_metrics`` at ``on_test_end``
(or ``on_validation_end`` with ``stage="val"``) and writes, on global rank zero only, into
``out_dir`` (default ``trainer.log_dir``, resolved on every rank: under DDP it is a collective):

- ``report.md``: a Markdown table, one row per task (then ``avg``), one column per metric;
- ``report.json``: ``{"stage", "module", "metrics", "tasks", "values": {metric: {task: value}}}``
  with the raw logged values;
- ``report.png``: a bar plot per metric (matplotlib, Agg backend; no display needed).

Add it to any LightningCLI run with ``-c callbacks/report.yaml``.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

_IDX = re.compile(r"/dataloader_idx_\d+$")


def collect_task_metrics(metrics: Mapping[str, Any], stage: str, names: Sequence[str],
                         task_order: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``{metric: {task: value}}`` from logged ``<stage>/<metric>/<task>`` keys.

    A ``/dataloader_idx_N`` suffix (Lightning adds it unless ``add_dataloader_idx=False``) is
    dropped. Tasks follow ``task_order`` (others after, sorted) and ``avg`` comes last; when
    ``avg`` was not logged it is the mean over the tasks.
    """
    out: dict[str, dict[str, float]] = {}
    for name in names:
        prefix = f"{stage}/{name}/"
        vals: dict[str, float] = {}
        for key, value in metrics.items():
            if key.startswith(prefix):
                task = _IDX.sub("", key[len(prefix):])
                vals[task] = float(value.item() if hasattr(value, "item") else value)
        if not vals:
            continue
        order = [t for t in (task_order or []) if t in vals and t != "avg"]
        order += sorted(t for t in vals if t not in order and t != "avg")
        table = {t: vals[t] for t in order}
        if "avg" in vals:
            table["avg"] = vals["avg"]
        elif order:
            table["avg"] = sum(vals[t] for t in order) / len(order)
        out[name] = table
    return out


def _scales(names: Sequence[str], scale: float | Mapping[str, float]) -> dict[str, float]:
    return {n: float(scale.get(n, 1.0)) if isinstance(scale, Mapping) else float(scale) for n in names}


def markdown_table(values: Mapping[str, Mapping[str, float]], scale: float | Mapping[str, float] = 1.0,
                   digits: int = 2) -> str:
    """A Markdown table: rows are tasks (``avg`` last, in bold), columns the metrics (``scale``: one
    factor for all, or one per metric: 100 shows a percentage)."""
    names = list(values)
    tasks: list[str] = []
    for name in names:
        tasks += [t for t in values[name] if t not in tasks]
    tasks = [t for t in tasks if t != "avg"] + (["avg"] if "avg" in tasks else [])
    scales = _scales(names, scale)

    def cell(name: str, task: str) -> str:
        v = values[name].get(task)
        if v is None or not math.isfinite(v):
            return "-" if v is None else str(v)
        s = f"{v * scales[name]:.{digits}f}"
        return f"**{s}**" if task == "avg" else s

    lines = ["| task | " + " | ".join(f"{n}{' (%)' if scales[n] == 100.0 else ''}" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for t in tasks:
        lines.append(f"| {'**avg**' if t == 'avg' else t} | " + " | ".join(cell(n, t) for n in names) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(values: Mapping[str, Mapping[str, float]], path: Path, scale: float | Mapping[str, float] = 1.0,
             title: str = "") -> None:
    """One bar subplot per metric (tasks, then ``avg`` in a darker colour), saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(values)
    scales = _scales(names, scale)
    width = max(4.0, 0.6 * max(len(v) for v in values.values()) + 1.5)
    fig = Figure(figsize=(width, 3.0 * len(names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        factor = scales[name]
        tasks = list(values[name])
        heights = [values[name][t] * factor for t in tasks]
        colors = ["#1f4e79" if t == "avg" else "#5b9bd5" for t in tasks]
        bars = ax.bar(range(len(tasks)), heights, color=colors)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 6 else 0, ha="right" if len(tasks) > 6 else "center")
        ax.set_ylabel(f"{name}{' (%)' if factor == 100.0 else ''}")
        ax.bar_label(bars, fmt="%.1f" if factor == 100.0 else "%.3f", fontsize=8)
        if factor == 100.0:
            ax.set_ylim(0, 105)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


class MultiTaskReport(Callback):
    """Write the per-task results of a test (or validation) run as Markdown, JSON and a bar plot.

    Args:
        out_dir: where to write; None uses ``trainer.log_dir`` (``trainer.default_root_dir`` when
            there is no logger).
        metrics: the metric names to collect (``test/<name>/<task>``); default: the module's
            ``metric_names`` (its task types' metrics), else ``acc``.
        stage: ``"test"`` (at ``on_test_end``) or ``"val"`` (at ``on_validation_end``, sanity
            check excluded).
        filename: the files' stem (``report`` -> ``report.md``, ``report.json``, ``report.png``).
        percent: show values times 100 in the table and plot (the JSON keeps the raw values); with
            a module that declares ``percent_metrics``, only those.
        plot: also write the PNG.
        title: the table's heading and the plot's title (default: the module's class name).
    """

    def __init__(self, out_dir: str | None = None, metrics: list[str] | None = None,
                 stage: Literal["test", "val"] = "test", filename: str = "report", percent: bool = True,
                 plot: bool = True, title: str | None = None) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.metrics = list(metrics) if metrics else None
        self.stage = stage
        self.filename = filename
        self.percent = percent
        self.plot = plot
        self.title = title
        self.report: dict[str, Any] | None = None
        """The last report written (the JSON's content), or None."""
        self.paths: list[Path] = []
        """The files the last report was written to."""

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "test":
            self.write(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "val" and not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def output_dir(self, trainer: pl.Trainer) -> Path:
        """``out_dir``, else the trainer's log directory, else its root directory."""
        return Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """Collect, write the files (global rank zero only) and return the report (None: nothing logged)."""
        out = self.output_dir(trainer)   # every rank: trainer.log_dir broadcasts under DDP
        dm = getattr(trainer, "datamodule", None)
        order = list(getattr(dm, "tasks", None) or getattr(pl_module, "tasks", None) or [])
        names = self.metrics or list(getattr(pl_module, "metric_names", None) or ["acc"])
        values = collect_task_metrics(trainer.callback_metrics, self.stage, names, order)
        if not values or not trainer.is_global_zero:
            return None
        title = self.title or type(pl_module).__name__
        tasks = [t for t in next(iter(values.values())) if t != "avg"]
        report = {"stage": self.stage, "module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                  "title": title, "global_step": int(trainer.global_step), "metrics": list(values),
                  "tasks": tasks, "values": values}
        out.mkdir(parents=True, exist_ok=True)
        declared = getattr(pl_module, "percent_metrics", None)
        scale: float | dict[str, float] = 100.0 if self.percent else 1.0
        if self.percent and declared is not None:
            scale = {n: 100.0 if n in declared else 1.0 for n in values}
        md, js = out / f"{self.filename}.md", out / f"{self.filename}.json"
        md.write_text(f"# {title}: {self.stage} results\n\n" + markdown_table(values, scale))
        js.write_text(json.dumps(report, indent=2) + "\n")
        self.paths = [md, js]
        if self.plot:
            png = out / f"{self.filename}.png"
            bar_plot(values, png, scale, title=f"{title} ({self.stage})")
            self.paths.append(png)
        self.report = report
        return report
