"""Merge benchmark: wall time and peak resident memory of `tvq merge` against the in-memory reference.

    python benchmarks/merge.py [--workdir /tmp/tvq_bench] [--out runs/bench]

theta_0: the open_clip ViT-B-32 image encoder (random init), 8 synthetic task vectors. For task
arithmetic and TIES, from an fp32 store and from a TVQ-INT4 store, every command runs in its own
process; its peak RSS comes from ``wait4`` and the interpreter-and-library baseline is the peak RSS
of a process that only imports them. Also: peak memory of `tvq merge` (INT4, task arithmetic and
TIES) at T = 2, 8, 16.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish, vit_b32_checkpoints, warm_page_cache  # noqa: E402

from tvq_lightning.errors import TvqError  # noqa: E402
from tvq_lightning.store import StoreConfig, TaskVectorStore, load_state_dict, quantize_to_store  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable


_WRAPPER = (
    "import os, resource, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "dt = time.perf_counter() - t0\n"
    "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
)


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command in its own process.

    The command runs under a minimal ``python -S`` wrapper: on Linux a child's ``ru_maxrss``
    starts from its parent's RSS at fork, so forking from this (large) process would inflate it.
    """
    res = subprocess.run([PY, "-S", "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    rc, dt, rss = res.stdout.split()
    if int(rc):
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}):\n{res.stderr}")
    return float(dt), int(rss)


def tvq_merge(pre: Path, store: Path, method: str, out: Path) -> list[str]:
    out.unlink(missing_ok=True)
    return [PY, "-m", "tvq_lightning", "merge", "--pretrained", str(pre), "--store", str(store), "--method", method,
            "--out", str(out), "--quiet"]


def reference(pre: Path, fts: list[Path], method: str, out: Path) -> list[str]:
    out.unlink(missing_ok=True)
    return [PY, str(HERE / "reference_merge.py"), "--method", method, "--pretrained", str(pre), "--finetuned",
            *map(str, fts), "--out", str(out)]


def build_store(pre: Path, ft: dict[str, Path], path: Path, cfg: StoreConfig) -> Path:
    """Build the store once; rebuild it when it is stale (other tasks, settings or theta_0)."""
    if (path / "layout.json").exists():
        try:
            s = TaskVectorStore(path)
            s.check_pretrained(load_state_dict(pre))
            if s.tasks == list(ft) and s.config == cfg:
                return path
        except TvqError:
            pass
    shutil.rmtree(path, ignore_errors=True)
    quantize_to_store(pre, ft, path, cfg, progress=False)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tvq_bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--scaling-tasks", type=int, nargs="*", default=[2, 8, 16])
    ap.add_argument("--only-scaling", action="store_true", help="skip the comparison with the in-memory reference")
    args = ap.parse_args(argv)
    w = args.workdir
    pre, ft_all = vit_b32_checkpoints(w, max([args.tasks, *args.scaling_tasks]))
    ft = {n: p for n, p in list(ft_all.items())[: args.tasks]}
    fp32_model = pre.stat().st_size
    stores = {"fp32": build_store(pre, ft, w / f"merge_fp32_T{args.tasks}", StoreConfig("fp32")),
              "tvq4": build_store(pre, ft, w / f"merge_tvq4_T{args.tasks}", StoreConfig("tvq", bits=4))}
    warm_page_cache([pre, *ft.values()])
    _, baseline = measure([PY, "-c", "import torch, numba, safetensors, tvq_lightning.cli.main, tvq_lightning.merging.engine"])
    out = w / "merged.safetensors"
    rows = []
    for method in () if args.only_scaling else ("task_arithmetic", "ties"):
        ref_t, ref_m = measure(reference(pre, list(ft.values()), method, out))
        for scheme, store in stores.items():
            t, m = measure(tvq_merge(pre, store, method, out))
            rows.append({"method": method, "store": scheme, "seconds": t, "peak_rss": m, "ref_seconds": ref_t,
                         "ref_peak_rss": ref_m, "time_ratio": t / ref_t, "mem_ratio": m / ref_m,
                         "over_baseline_models": (m - baseline) / fp32_model})
            r = rows[-1]
            print(f"{method:>16} {scheme:>5}: tvq merge {t:6.2f} s {m / 2**20:7.0f} MiB | reference {ref_t:6.2f} s "
                  f"{ref_m / 2**20:7.0f} MiB | time x{r['time_ratio']:.2f} memory x{r['mem_ratio']:.2f} | "
                  f"above baseline: {r['over_baseline_models']:.2f} fp32 models", flush=True)
    scaling = []
    for T in args.scaling_tasks:
        sub = {n: p for n, p in list(ft_all.items())[:T]}
        store = build_store(pre, sub, w / f"merge_tvq4_T{T}", StoreConfig("tvq", bits=4))
        for method in ("task_arithmetic", "ties"):
            t, m = measure(tvq_merge(pre, store, method, out))
            scaling.append({"tasks": T, "method": method, "seconds": t, "peak_rss": m})
            print(f"T={T:>2} {method:>16}: {t:6.2f} s, peak {m / 2**20:7.0f} MiB", flush=True)
    lines = [f"Baseline (interpreter + libraries): {baseline / 2**20:.0f} MiB; one fp32 model: {fp32_model / 2**20:.0f} MiB.",
             "", "| method | store | tvq merge s | peak MiB | reference s | reference MiB | time ratio | memory ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['store']} | {r['seconds']:.2f} | {r['peak_rss'] / 2**20:.0f} | {r['ref_seconds']:.2f} | "
                     f"{r['ref_peak_rss'] / 2**20:.0f} | {r['time_ratio']:.2f} | {r['mem_ratio']:.2f} |")
    lines += ["", "| T | method | seconds | peak MiB |", "|---:|---|---:|---:|"]
    lines += [f"| {s['tasks']} | {s['method']} | {s['seconds']:.2f} | {s['peak_rss'] / 2**20:.0f} |" for s in scaling]
    publish(args.out, "merge_scaling" if args.only_scaling else "merge", "\n".join(lines),
            {"baseline_rss": baseline, "fp32_model_bytes": fp32_model, "rows": rows, "scaling": scaling})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
