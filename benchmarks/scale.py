"""Scale benchmark: the open_clip ViT-L/14 image encoder (random init, 304 M parameters) x 20 synthetic
fine-tunes, on one machine, through the `tvq` command line.

    python benchmarks/scale.py [--workdir /tmp/tvq_scale] [--out runs/bench] [--tasks 20]

Steps, each in its own process (wall time and peak RSS from ``wait4``; see merge.py's ``measure``):
`tvq quantize` into a TVQ-INT4 and an RTVQ (B3O2) store, then `tvq merge` task arithmetic and TIES
from each. The in-memory reference merge (benchmarks/reference_merge.py: every fine-tune in memory,
the task vectors, and for TIES their T x P matrix) cannot run on a 24 GB machine at this size; its
need is computed from the tensors it holds at once and printed beside the measured numbers.

The checkpoints (fp32 safetensors, 1.2 GB each; ~26 GB for θ0 + 20) are written once under
``--workdir`` and reused. Targets (issue "CLIP zoo", item 6): TIES over 20 tasks from the INT4 store
<= 1.5 GB peak RSS and <= 45 s, task arithmetic <= 20 s.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402
from merge import PY, measure, tvq_merge  # noqa: E402

import torch  # noqa: E402

from tvq_lightning.data.synthetic import synthetic_task_vector  # noqa: E402
from tvq_lightning.store.checkpoints import load_state_dict  # noqa: E402
from tvq_lightning.store.st_stream import save_safetensors  # noqa: E402

GB = 1e9
TARGETS = {("tvq4", "ties"): (1.5 * GB, 45.0), ("tvq4", "task_arithmetic"): (None, 20.0)}
STORES = {"tvq4": ["--scheme", "tvq", "--bits", "4"],
          "rtvq_b3o2": ["--scheme", "rtvq", "--base-bits", "3", "--offset-bits", "2"]}


def vit_l14_checkpoints(workdir: Path, num_tasks: int, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """θ0 = open_clip ViT-L-14 image encoder (random init, no download) and ``num_tasks`` fine-tunes."""
    workdir.mkdir(parents=True, exist_ok=True)
    pre_path = workdir / "vitl14_pretrained.safetensors"
    if not pre_path.exists():
        import open_clip

        torch.manual_seed(seed)
        visual = open_clip.create_model("ViT-L-14", pretrained=None).visual
        save_safetensors({k: v.detach().contiguous() for k, v in visual.state_dict().items()}, pre_path)
        del visual
    pre = None
    paths = {}
    for t in range(num_tasks):
        p = workdir / f"vitl14_task{t:02d}.safetensors"
        if not p.exists():
            pre = pre or load_state_dict(pre_path)
            tau = synthetic_task_vector(pre, seed=1000 + t, scale=1e-3)
            save_safetensors({k: v + tau.pop(k) if k in tau else v for k, v in pre.items()}, p)
            print(f"wrote {p.name}", flush=True)
        paths[f"task{t:02d}"] = p
    return pre_path, paths


def reference_need(model_bytes: int, num_tasks: int, method: str) -> int:
    """Bytes the in-memory reference holds at its peak (a lower bound: allocator slack not counted).

    θ0 + T fine-tuned models + T task vectors are alive together; TIES adds the T x P matrix of the
    flattened task vectors and the ``abs()`` copy its k-th value is taken from.
    """
    held = (1 + 2 * num_tasks) * model_bytes
    return held + (2 * num_tasks * model_bytes if method == "ties" else 0)


def tvq_quantize(pre: Path, ft: dict[str, Path], store: Path, scheme: str) -> list[str]:
    shutil.rmtree(store, ignore_errors=True)
    return [PY, "-m", "tvq_lightning", "quantize", "--pretrained", str(pre), "--finetuned",
            *(f"{n}={p}" for n, p in ft.items()), "--out", str(store), *STORES[scheme], "--quiet"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tvq_scale"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--stores", nargs="+", default=list(STORES), choices=list(STORES))
    args = ap.parse_args(argv)
    pre, ft = vit_l14_checkpoints(args.workdir, args.tasks)
    model_bytes = pre.stat().st_size
    _, baseline = measure([PY, "-c", "import torch, numba, safetensors, tvq_lightning.cli.main, tvq_lightning.merging.engine"])
    rows = []
    merged = args.workdir / "merged.safetensors"

    def row(step: str, scheme: str, t: float, m: int, ref: int | None = None) -> None:
        mem_t, time_t = TARGETS.get((scheme, step), (None, None))
        rows.append({"step": step, "store": scheme, "seconds": t, "peak_rss": m, "reference_need": ref,
                     "target_rss": mem_t, "target_seconds": time_t})
        print(f"{step:>16} {scheme:>9}: {t:7.1f} s, peak {m / GB:5.2f} GB"
              + (f" | reference needs >= {ref / GB:5.1f} GB" if ref else ""), flush=True)

    for scheme in args.stores:
        store = args.workdir / f"store_{scheme}_T{args.tasks}"
        t, m = measure(tvq_quantize(pre, ft, store, scheme))
        row("quantize", scheme, t, m)
        for method in ("task_arithmetic", "ties"):
            t, m = measure(tvq_merge(pre, store, method, merged))
            row(method, scheme, t, m, reference_need(model_bytes, args.tasks, method))
    merged.unlink(missing_ok=True)

    def verdict(r) -> str:
        ok = [(r["target_rss"] is None or r["peak_rss"] <= r["target_rss"]),
              (r["target_seconds"] is None or r["seconds"] <= r["target_seconds"])]
        if r["target_rss"] is None and r["target_seconds"] is None:
            return ""
        want = " and ".join(s for s in (f"<= {r['target_rss'] / GB:.1f} GB" if r["target_rss"] else "",
                                         f"<= {r['target_seconds']:.0f} s" if r["target_seconds"] else "") if s)
        return f"{want}: {'met' if all(ok) else 'MISSED'}"

    lines = [f"ViT-L/14 image encoder x {args.tasks} tasks; one fp32 checkpoint {model_bytes / GB:.2f} GB, "
             f"all fine-tunes {args.tasks * model_bytes / GB:.1f} GB; interpreter + libraries {baseline / GB:.2f} GB.",
             "", "| step | store | seconds | peak RSS GB | reference in-memory need GB | target |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ref = f"{r['reference_need'] / GB:.1f}" if r["reference_need"] else "–"
        lines.append(f"| {r['step']} | {r['store']} | {r['seconds']:.1f} | {r['peak_rss'] / GB:.2f} | {ref} | {verdict(r)} |")
    publish(args.out, "scale", "\n".join(lines),
            {"tasks": args.tasks, "model_bytes": model_bytes, "baseline_rss": baseline, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
