"""The sweep's outputs: ``results.json`` (every cell), ``table.md`` (method × scheme averages, the
stores' bytes, the FP32 per-task table) and ``table.png`` (the averages as a heat map)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..demo.report import save_figure
from ..store.io import atomic_write_bytes, atomic_write_json

ROW_ORDER = ("individual", "task_arithmetic", "ties", "emr", "consensus", "lines", "magmax", "breadcrumbs")


def rows(results: Mapping[str, Mapping]) -> list[str]:
    """The methods in the papers' order, then any other."""
    return [m for m in ROW_ORDER if m in results] + [m for m in results if m not in ROW_ORDER]


def markdown(report: Mapping) -> str:
    res, storage, tasks = report["results"], report["storage"], report["tasks"]
    schemes = list(storage)
    lines = [f"# tvq sweep\n\n{len(tasks)} tasks ({', '.join(tasks)}); test accuracy (%), mean over tasks; "
             "each method's option chosen on validation with the FP32 store.\n",
             "| method | " + " | ".join(schemes) + " |", "|" + "---|" * (len(schemes) + 1)]
    for m in rows(res):
        cells = []
        for s in schemes:
            c = res[m].get(s)
            cells.append("" if c is None else f"{c['avg']:.1f}" + (f" (λ={c['value']})" if m != "individual" and s == "fp32"
                                                                      and c.get("value") is not None else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| **% of fp32 bytes** | " + " | ".join(f"{100 * storage[s]['ratio_to_fp32']:.2f}" for s in schemes) + " |")
    lines += ["", "## Per task (FP32 store)", "", "| method | " + " | ".join(tasks) + " | avg |",
              "|" + "---|" * (len(tasks) + 2)]
    for m in rows(res):
        c = res[m].get("fp32")
        if c:
            lines.append(f"| {m} | " + " | ".join(f"{c['per_task'][t]:.1f}" for t in tasks) + f" | {c['avg']:.1f} |")
    return "\n".join(lines) + "\n"


def heatmap(report: Mapping, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res, schemes = report["results"], list(report["storage"])
    methods = rows(res)
    grid = np.full((len(methods), len(schemes)), np.nan)
    for i, m in enumerate(methods):
        for j, s in enumerate(schemes):
            if s in res[m]:
                grid[i, j] = res[m][s]["avg"]
    fig, ax = plt.subplots(figsize=(1.2 * len(schemes) + 2.5, 0.45 * len(methods) + 1.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(schemes)), schemes, fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    for i in range(len(methods)):
        for j in range(len(schemes)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(report: dict, stores: Mapping[str, Path], out: Path) -> None:
    """Add each store's bytes to ``report`` and write ``results.json``, ``table.md``, ``table.png``."""
    from ..demo.evaluate import storage_entry
    from ..store.reader import TaskVectorStore

    storage = {}
    for s, p in stores.items():
        st = TaskVectorStore(p)
        storage[s] = storage_entry(st)
        st.close()
    report["storage"] = storage
    atomic_write_json(out / "results.json", report)
    atomic_write_bytes(out / "table.md", markdown(report).encode())
    heatmap(report, out / "table.png")
