"""The demo's report: ``report.json``, ``report.md`` (the main table), the findings and PNG plots.

``report.json``::

    {"tasks": [...],
     "results": {METHOD: {SCHEME: {"avg": float, "per_task": {TASK: float}, ...}}},
     "storage": {SCHEME: {"bytes": int, "ratio_to_fp32": float, "bits_per_param": float}},
     "diagnostics": {SCHEME: {"rel_l2_error": float}, "range_ratio": float, "task_vector_cosine": float},
     "analysis": {...}, "findings": [{"claim", "value", "holds"}], "timings": {PHASE: seconds},
     "config": {...}, "machine": "..."}
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

from ..store.io import atomic_write_bytes, atomic_write_json

METHOD_ORDER = ("pretrained", "individual", "task_arithmetic", "ties", "emr", "consensus", "lines", "magmax",
                "breadcrumbs", "adamerging_task", "adamerging_layer", "tinting")
LABELS = {"fp32": "FP32", "fq8": "FQ8", "fq4": "FQ4", "tvq8": "TVQ8", "tvq4": "TVQ4", "tvq3": "TVQ3", "tvq2": "TVQ2",
          "rtvq_b3o2": "RTVQ B3O2", "budget": "budget", "bitdelta": "BitDelta"}


def _columns(report: dict) -> list[tuple[str, str]]:
    """(report name, column label) of every store: the known ones in LABELS' order, then any other
    (a newly registered scheme) under its store label."""
    sto = report["storage"]
    known = [(s, LABELS[s]) for s in LABELS if s in sto]
    return known + [(s, str(sto[s].get("label", s))) for s in sto if s not in LABELS]


def machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def findings(report: dict) -> list[dict]:
    """The TVQ paper's claims, checked on this run's numbers."""
    res, diag, sto = report["results"], report["diagnostics"], report["storage"]
    out = []

    def claim(text: str, value: str, holds: bool) -> None:
        out.append({"claim": text, "value": value, "holds": bool(holds)})

    def avg(method: str, scheme: str) -> float | None:
        return res.get(method, {}).get(scheme, {}).get("avg")

    for method in ("individual", "task_arithmetic"):
        a, b = avg(method, "tvq4"), avg(method, "fp32")
        if a is not None and b is not None:
            claim(f"|TVQ-INT4 - FP32| <= 0.5 points ({method})", f"{a - b:+.2f}", abs(a - b) <= 0.5)
        a = avg(method, "tvq3")
        if a is not None and b is not None:
            claim(f"|TVQ-INT3 - FP32| <= 1 point ({method})", f"{a - b:+.2f}", abs(a - b) <= 1.0)
    a, b = avg("individual", "tvq2"), avg("individual", "tvq4")
    if a is not None and b is not None:
        claim("TVQ-INT2 < TVQ-INT4 (individual)", f"{a:.2f} vs {b:.2f}", a < b)
    if "rtvq_b3o2" in sto:
        # the paper's table reports RTVQ for merged models only; individual models are checked too
        for method in ("individual", "task_arithmetic"):
            a, b = avg(method, "rtvq_b3o2"), avg(method, "fp32")
            if a is not None and b is not None:
                claim(f"|RTVQ B3O2 - FP32| <= 2 points ({method})", f"{a - b:+.2f}", abs(a - b) <= 2.0)
        for method in ("individual", "task_arithmetic"):
            a, b = avg(method, "rtvq_b3o2"), avg(method, "tvq2")
            if a is not None and b is not None:
                claim(f"RTVQ B3O2 > TVQ-INT2 ({method})", f"{a:.2f} vs {b:.2f}", a > b)
        r = sto["rtvq_b3o2"]["ratio_to_fp32"]
        claim("RTVQ B3O2 <= 8 % of the fp32 bytes", f"{100 * r:.2f} %", r <= 0.08)
    errs = [diag.get(s, {}).get("rel_l2_error") for s in ("tvq8", "tvq4", "tvq3", "tvq2")]
    if None not in errs:
        claim("rel. L2 error TVQ8 < TVQ4 < TVQ3 < TVQ2", " < ".join(f"{e:.4f}" for e in errs),
              errs[0] < errs[1] < errs[2] < errs[3])
    if "fq4" in diag and "tvq4" in diag:
        ratio = diag["fq4"]["rel_l2_error"] / max(diag["tvq4"]["rel_l2_error"], 1e-12)
        claim("rel. L2 error FQ4 >= 10x TVQ4", f"{ratio:.1f}x", ratio >= 10)
    claim("range(θ) / range(τ) >= 10", f"{diag['range_ratio']:.1f}", diag["range_ratio"] >= 10)
    pre, ind, ta = avg("pretrained", "fp32"), avg("individual", "fp32"), avg("task_arithmetic", "fp32")
    if None not in (pre, ind, ta):
        gap = (ta - pre) / (ind - pre) if ind != pre else 0.0
        claim("task arithmetic recovers >= 25 % of the pretrained -> individual gap", f"{100 * gap:.0f} %", gap >= 0.25)
        tint, layer = avg("tinting", "fp32"), avg("adamerging_layer", "fp32")
        if tint is not None:
            claim("Tinting++ >= task arithmetic + 5 points", f"{tint - ta:+.2f}", tint >= ta + 5)
        if layer is not None:
            claim("layer-wise AdaMerging >= task arithmetic", f"{layer - ta:+.2f}", layer >= ta)
    return out


def main_table(report: dict) -> str:
    columns = _columns(report)
    schemes = [s for s, _ in columns]
    head = "| method | " + " | ".join(label for _, label in columns) + " |"
    lines = [head, "|" + "---|" * (len(schemes) + 1)]
    for m in METHOD_ORDER:
        row = report["results"].get(m)
        if not row:
            continue
        cells = [f"{row[s]['avg']:.1f}" if s in row else "" for s in schemes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    sto = report["storage"]
    lines.append("| **% of fp32 bytes** | " + " | ".join(f"{100 * sto[s]['ratio_to_fp32']:.2f}" for s in schemes) + " |")
    diag = report["diagnostics"]
    lines.append("| **rel. L2 error of τ̂** | " + " | ".join(f"{diag[s]['rel_l2_error']:.4f}" for s in schemes) + " |")
    return "\n".join(lines)


def per_task_table(report: dict, scheme: str = "fp32") -> str:
    tasks = report["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " | avg |", "|" + "---|" * (len(tasks) + 2)]
    for m in METHOD_ORDER:
        cell = report["results"].get(m, {}).get(scheme)
        if cell:
            lines.append(f"| {m} | " + " | ".join(f"{cell['per_task'][t]:.1f}" for t in tasks) + f" | {cell['avg']:.1f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    f = "\n".join(f"- [{'x' if c['holds'] else ' '}] {c['claim']}: {c['value']}" for c in report["findings"])
    t = report["timings"]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
    a = report.get("analysis", {}).get("task_arithmetic_loss")
    loss = "" if not a else (
        f"\nTask arithmetic at λ = {a['scaling']}: each task's own vector alone (θ0 + λ τ_t) reaches {a['own_vector']:.1f}, "
        f"the merge {a['merged']:.1f}, individual models {a['individual']:.1f}: under-scaling costs "
        f"{a['individual'] - a['own_vector']:.1f} points, interference {a['own_vector'] - a['merged']:.1f}.\n")
    d = report["diagnostics"]
    if "task_vector_cosine" in d:
        loss += (f"\nrange(θ) / range(τ) = {d['range_ratio']:.1f}; mean pairwise cosine of the task vectors "
                 f"(quantized tensors) = {d['task_vector_cosine']:.3f}.\n")
    return (f"# tvq demo report\n\n{len(report['tasks'])} tasks ({', '.join(report['tasks'])}); test accuracy (%), "
            f"8-task mean unless fewer tasks. Machine: {report['machine']}; total {t.get('total', 0):.0f} s.\n\n"
            f"{main_table(report)}\n\n## Per task (FP32 store)\n\n{per_task_table(report)}\n{loss}\n"
            f"## Findings\n\n{f}\n\n## Timings\n\n{timing}\n")


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    res, sto = report["results"], report["storage"]
    tvq = [s for s in ("tvq2", "tvq3", "tvq4", "tvq8", "fp32") if s in sto]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHOD_ORDER:
        row = res.get(m, {})
        pts = [(sto[s]["bits_per_param"], row[s]["avg"]) for s in tvq if s in row]
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", label=m)
        for s, mk in (("fq4", "x"), ("rtvq_b3o2", "s"), ("budget", "^")):
            if s in row and s in sto:
                ax.scatter(sto[s]["bits_per_param"], row[s]["avg"], marker=mk, color="k", s=18)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per parameter (TVQ line; x FQ4, square RTVQ B3O2, triangle budget)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "accuracy_vs_bits.png"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [s for s in LABELS if s in sto]
    ax.bar([LABELS[s] for s in names], [sto[s]["bytes"] / 1e6 for s in names])
    ax.set_ylabel("MB on disk (all tasks)")
    fig.tight_layout()
    paths.append(save_figure(fig, out / "storage.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    shown = [m for m in ("pretrained", "individual", "task_arithmetic", "adamerging_layer", "tinting") if "fp32" in res.get(m, {})]
    tasks = report["tasks"]
    w = 0.8 / max(len(shown), 1)
    for i, m in enumerate(shown):
        ax.bar([j + i * w for j in range(len(tasks))], [res[m]["fp32"]["per_task"][t] for t in tasks], w, label=m)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], tasks, fontsize=7)
    ax.set_ylabel("test accuracy (%), FP32 store")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "per_task.png"))
    return paths


def save_figure(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_report(report: dict, out: Path) -> str:
    """Findings, plots, ``report.md`` and ``report.json`` (with the report phase's own time)."""
    t0 = time.perf_counter()
    classification = "results" in report        # absent under ``--suite dense``
    if classification:
        report["findings"] = findings(report)
        plots(report, out)
    dt = time.perf_counter() - t0
    report["timings"]["report"] = dt
    report["timings"]["total"] = report["timings"].get("total", 0.0) + dt
    md = markdown(report) if classification else f"# tvq demo report\n\nMachine: {report.get('machine', machine())}.\n"
    if "dense" in report:    # the dense suite's section (tvq_lightning.demo.dense)
        from .dense.report import markdown as dense_markdown

        md += "\n" + dense_markdown(report["dense"])
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", md.encode())
    return md
