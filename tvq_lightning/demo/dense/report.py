"""The dense section of the demo's report: findings, markdown tables and PNG plots.

``report.json["dense"]``::

    {"tasks": [...],
     "results": {METHOD: {SCHEME: {"delta_m": float (%), "per_task": {TASK: {METRIC: value}}, ...}}},
     "storage": {SCHEME: {"bytes": int, "ratio_to_fp32": float, "bits_per_param": float}},
     "diagnostics": {SCHEME: {"rel_l2_error": float}, "range_ratio": float, "task_vector_cosine": float},
     "findings": [{"claim", "value", "holds"}], "bn_stats": "mean", "timings": {PHASE: seconds},
     "config": {...}}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from ..report import LABELS, save_figure

DENSE_METHOD_ORDER = ("pretrained_decoders", "individual", "task_arithmetic", "ties", "magmax", "breadcrumbs", "emr",
                      "consensus", "lines", "adamerging_layer", "tinting")
ADAPTIVE = ("adamerging_layer", "tinting")


def _main_metric(cell: dict, task: str) -> float:
    return next(iter(cell["per_task"][task].values()))


def findings(section: dict) -> list[dict]:
    """The paper's claims on the dense benchmark, checked on this run's numbers."""
    res, sto = section["results"], section["storage"]
    out: list[dict] = []

    def claim(text: str, value: str, holds: bool) -> None:
        out.append({"claim": text, "value": value, "holds": bool(holds)})

    def get(method: str, scheme: str) -> dict | None:
        return res.get(method, {}).get(scheme)

    for method in ("individual", "task_arithmetic"):
        a, b = get(method, "tvq4"), get(method, "fp32")
        if a and b:
            rel = {t: (_main_metric(a, t) - _main_metric(b, t)) / abs(_main_metric(b, t)) for t in section["tasks"]}
            worst = max(abs(v) for v in rel.values())
            claim(f"TVQ-INT4 within 1 % (relative) of FP32 on every task's main metric ({method})",
                  ", ".join(f"{t} {100 * v:+.2f} %" for t, v in rel.items()), worst <= 0.01)
    a, b = get("individual", "tvq2"), get("individual", "tvq4")
    if a and b:
        claim("TVQ-INT2 worse than TVQ-INT4 (individual, Δm)", f"{a['delta_m']:+.2f} vs {b['delta_m']:+.2f}",
              a["delta_m"] < b["delta_m"])
    if "rtvq_b3o2" in sto:
        for method in ("individual", "task_arithmetic"):
            a, b = get(method, "rtvq_b3o2"), get(method, "tvq2")
            if a and b:
                claim(f"RTVQ B3O2 better than TVQ-INT2 ({method}, Δm)", f"{a['delta_m']:+.2f} vs {b['delta_m']:+.2f}",
                      a["delta_m"] > b["delta_m"])
        # B3O2 costs (3 + 2T) / T bits per parameter and task: above 8 % of 32 bits for T < 6
        r, n = sto["rtvq_b3o2"]["ratio_to_fp32"], len(section["tasks"])
        claim("RTVQ B3O2 at <= 8 % of the fp32 bytes", f"{100 * r:.2f} % (bit-count theory at {n} tasks: "
              f"{100 * (3 + 2 * n) / (32 * n):.2f} %)", r <= 0.08)
    ta = get("task_arithmetic", "fp32")
    adapted = [(m, get(m, "fp32")) for m in ADAPTIVE if get(m, "fp32")]
    if ta and adapted:
        best_m, best = max(adapted, key=lambda p: p[1]["delta_m"])
        gain = best["delta_m"] - ta["delta_m"]
        tint = "Tinting++" if section.get("config", {}).get("tinting_confidence_sampling") else "Model Tinting"
        claim(f"dense adaptation (AdaMerging or {tint}) improves Δm over task arithmetic by >= 5 points",
              f"{best_m} {gain:+.2f} (" + ", ".join(f"{m} {c['delta_m'] - ta['delta_m']:+.2f}" for m, c in adapted) + ")",
              gain >= 5.0)
    p0 = get("pretrained_decoders", "fp32")
    if ta and p0:
        vs = ta.get("delta_m_vs_pretrained_decoders")
        claim("task arithmetic's Δm against the individual models and against θ0 with trained decoders (reported)",
              f"{ta['delta_m']:+.2f} vs individual, {vs:+.2f} vs θ0 + trained decoders", True)
    return out


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def markdown(section: dict) -> str:
    res, sto, diag = section["results"], section["storage"], section["diagnostics"]
    schemes = [s for s in LABELS if s in sto]
    lines = ["| Δm (%) | " + " | ".join(LABELS[s] for s in schemes) + " |", "|" + "---|" * (len(schemes) + 1)]
    for m in DENSE_METHOD_ORDER:
        row = res.get(m)
        if row:
            lines.append(f"| {m} | " + " | ".join(f"{row[s]['delta_m']:+.2f}" if s in row else "" for s in schemes) + " |")
    lines.append("| **% of fp32 bytes** | " + " | ".join(f"{100 * sto[s]['ratio_to_fp32']:.2f}" for s in schemes) + " |")
    lines.append("| **rel. L2 error of τ̂** | " + " | ".join(f"{diag[s]['rel_l2_error']:.4f}" for s in schemes) + " |")
    tasks = section["tasks"]
    first = res["individual"]["fp32"]["per_task"]
    cols = [(t, k) for t in tasks for k in first[t]]
    per = ["| method / store | " + " | ".join(f"{t[:5]} {k}" for t, k in cols) + " | Δm |", "|" + "---|" * (len(cols) + 2)]
    for m in DENSE_METHOD_ORDER:
        for s, c in res.get(m, {}).items():
            per.append(f"| {m} / {s} | " + " | ".join(_fmt(c["per_task"][t][k]) for t, k in cols) + f" | {c['delta_m']:+.2f} |")
    f = "\n".join(f"- [{'x' if c['holds'] else ' '}] {c['claim']}: {c['value']}" for c in section["findings"])
    t = section["timings"]
    ta = res.get("task_arithmetic", {}).get("fp32", {})
    return (f"# Dense suite\n\n{len(tasks)} tasks ({', '.join(tasks)}) on rendered scenes "
            f"({section['config']['image_size']}x{section['config']['image_size']}); θ0: the shipped scene encoder "
            f"(tu-resnet10t). Δm relative to the FP32 individual models (each task's mean over two metrics, then "
            f"the mean over tasks). BatchNorm statistics of every merged encoder: \"{section['bn_stats']}\" "
            f"(the experts' mean); individual models keep their own. λ chosen on validation with the FP32 store "
            f"(task arithmetic: {ta.get('value')}); task arithmetic against θ0 with the trained decoders: "
            f"{ta.get('delta_m_vs_pretrained_decoders', float('nan')):+.2f}.\n\n"
            + "\n".join(lines) + "\n\n## Per task (main metric first)\n\n" + "\n".join(per)
            + f"\n\nrange(θ) / range(τ) = {diag['range_ratio']:.1f}; mean pairwise cosine of the task vectors = "
            f"{diag['task_vector_cosine']:.3f}.\n\n## Dense findings\n\n{f}\n\n## Dense timings\n\n"
            + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + "\n")


def delta_m_plot(section: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, sto = section["results"], section["storage"]
    schemes = [s for s in LABELS if s in sto]
    methods = [m for m in DENSE_METHOD_ORDER if m in res]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / max(len(schemes), 1)
    for i, s in enumerate(schemes):
        xs = [j + i * w for j, m in enumerate(methods) if s in res[m]]
        ax.bar(xs, [res[m][s]["delta_m"] for m in methods if s in res[m]], w, label=LABELS[s])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(methods))], methods, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Δm (%) vs FP32 individual models")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "dense_delta_m.png")


_PALETTE = np.array([[0, 0, 0], [200, 200, 200], [140, 90, 40], [230, 60, 60], [60, 160, 60], [60, 90, 220],
                     [230, 200, 40], [180, 80, 200], [60, 200, 200], [250, 140, 0]], np.float32) / 255.0


def _show(task: str, x: Tensor, vmax: float) -> np.ndarray:
    """One map as an RGB image: segmentation with a palette (void black), depth as a colour map,
    normals as RGB ((n + 1) / 2; void black)."""
    import matplotlib

    a = x.detach().float().cpu().numpy()
    if task == "segmentation":
        return _PALETTE[(a.astype(np.int64) + 1) % len(_PALETTE)]
    if task == "depth":
        a = a[0]
        rgb = matplotlib.colormaps["viridis"](np.clip(a / max(vmax, 1e-6), 0, 1))[..., :3]
        rgb[a <= 0] = 0
        return rgb
    valid = np.abs(a).sum(0) > 0
    return np.clip((a.transpose(1, 2, 0) + 1) / 2, 0, 1) * valid[..., None]


def picture_grids(tasks: list[str], images: Tensor, targets: dict[str, Tensor], preds: dict[str, dict[str, Tensor]],
                  out: Path) -> list[Path]:
    """Per task, rows of test images: input, ground truth, then each row of ``preds`` (label -> task -> maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    img = images.detach().float()
    lo, hi = img.amin(dim=(1, 2, 3), keepdim=True), img.amax(dim=(1, 2, 3), keepdim=True)
    img = ((img - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1).numpy()
    for t in tasks:
        cols = [("input", None), ("ground truth", targets[t])] + [(k, v[t]) for k, v in preds.items() if t in v]
        n = min(len(img), *(len(v) for _, v in cols if v is not None))
        vmax = float(targets[t].max()) if t == "depth" else 1.0
        fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.7 * n), squeeze=False)
        for r in range(n):
            for c, (label, maps) in enumerate(cols):
                ax = axes[r][c]
                ax.imshow(img[r] if maps is None else _show(t, maps[r], vmax), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(label, fontsize=7)
        fig.suptitle(t, fontsize=9)
        fig.tight_layout()
        paths.append(save_figure(fig, out / f"dense_{t}.png"))
    return paths
