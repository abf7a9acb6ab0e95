"""AdaMerging benchmark: step time and peak memory of layer-wise AdaMerging, fp32 store vs TVQ-INT4 store.

    python benchmarks/adamerging.py [--steps 3] [--batch 4] [--tasks 8] [--workdir /tmp/tvq_bench]
    python benchmarks/adamerging.py --device cuda [--bf16] --tasks 20     # on a GPU (peak GPU memory too)

theta_0: the open_clip ViT-B-32 image encoder (random init), 8 synthetic task vectors, random
224x224 images, batch 4 per task, on CPU. Each store runs in its own process (peak RSS via a
minimal wrapper, see merge.py); the step time is the best of ``--steps`` optimizer steps after a
warm-up step. The task vectors stay packed on the device and are dequantized inside the merge,
so the INT4 run holds packed codes where the fp32 run holds 8 fp32 copies. Memory is reported as
the peak RSS during the adaptation steps (the kernel's peak counter is reset after set-up, which
builds a whole open_clip model and copies the encoder) and as the whole process's peak. Like
``tvq fit``, whose CLI entry point does so for every command, the worker first fixes glibc's mmap
threshold (:func:`tvq_lightning.runtime.configure_allocator`), so that the memory of freed
block-sized tensors goes back to the OS instead of lingering in the heap arenas.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish, vit_b32_checkpoints  # noqa: E402
from merge import PY, build_store, measure  # noqa: E402

from tvq_lightning.store import StoreConfig  # noqa: E402


def worker(store: str, pre: str, steps: int, batch: int, out: str, device: str = "cpu", bf16: bool = False) -> None:
    from tvq_lightning.runtime import configure_allocator

    configure_allocator()  # as the CLI (tvq fit) does at start, before the model is built
    import open_clip
    import torch

    from tvq_lightning.models.heads import ClassificationHead
    from tvq_lightning.modules.adamerging import AdaMerging
    from tvq_lightning.store import TaskVectorStore, load_state_dict

    torch.manual_seed(0)
    encoder = open_clip.create_model("ViT-B-32", pretrained=None).visual
    encoder.load_state_dict(load_state_dict(pre))  # theta_0 in place: the module needs no copy of it
    tasks = TaskVectorStore(store).tasks
    heads = {t: ClassificationHead(torch.randn(10, 512)) for t in tasks}
    module = AdaMerging(encoder, store, tasks=tasks, heads=heads, granularity="layer").to(device)
    opt = torch.optim.Adam([module.coefficients], lr=1e-3)
    batch_t = {t: torch.randn(batch, 3, 224, 224, device=device) for t in tasks}
    cuda = torch.device(device).type == "cuda"
    import contextlib
    import gc

    gc.collect()
    reset_peak()  # from here on: the adaptation's own peak (model set-up transients excluded)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_rss = current_rss()
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        with autocast:
            loss = module.adaptation_loss(batch_t)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps({"step_s": min(times[1:]), "packed_bytes": module.packed.nbytes(),
                                     "adapt_peak_rss": peak_rss(), "start_rss": start_rss,
                                     "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None}))


# INT4 / fp32 targets (performance issue): adaptation memory by task count, and step time
MEMORY_TARGETS = {8: 0.40, 20: 0.25}
STEP_TARGET = 1.2


def targets(tasks: int, memory_ratio: float, step_ratio: float) -> list[str]:
    """The measured ratios beside the targets that apply at this task count."""
    rows = [("memory during adaptation", memory_ratio, MEMORY_TARGETS.get(tasks)), ("step time", step_ratio, STEP_TARGET)]
    return [f"- {name}: x{got:.2f}, target <= {want:.2f}: {'met' if got <= want else 'MISSED'}"
            for name, got, want in rows if want is not None]


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """Peak RSS (VmHWM) since the last :func:`reset_peak`, in bytes."""
    return _status("VmHWM")


def current_rss() -> int:
    """Current RSS (VmRSS), in bytes."""
    return _status("VmRSS")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tvq_bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU run (peak GPU memory is reported too)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward")
    ap.add_argument("--worker", nargs=3, metavar=("STORE", "PRETRAINED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], args.steps, args.batch, args.worker[2], args.device, args.bf16)
        return 0
    pre, ft = vit_b32_checkpoints(args.workdir, args.tasks)
    ft = dict(list(ft.items())[: args.tasks])
    rows = {}
    for scheme, cfg in (("fp32", StoreConfig("fp32")), ("tvq4", StoreConfig("tvq", bits=4))):
        store = build_store(pre, ft, args.workdir / f"merge_{scheme}_T{args.tasks}", cfg)
        res = args.workdir / f"adamerging_{scheme}.json"
        wall, rss = measure([PY, str(Path(__file__).resolve()), "--steps", str(args.steps), "--batch", str(args.batch),
                             "--device", args.device, *(["--bf16"] if args.bf16 else []),
                             "--worker", str(store), str(pre), str(res)])
        rows[scheme] = {**json.loads(res.read_text()), "peak_rss": rss, "wall_s": wall}
        r = rows[scheme]
        print(f"{scheme:>5}: step {r['step_s']:.2f} s, peak RSS during adaptation {r['adapt_peak_rss'] / 2**20:.0f} MiB "
              f"(RSS when it starts {r['start_rss'] / 2**20:.0f} MiB; process peak incl. model set-up {rss / 2**20:.0f} MiB), "
              f"packed task vectors "
              f"{r['packed_bytes'] / 2**20:.0f} MiB", flush=True)
    f, q = rows["fp32"], rows["tvq4"]
    gpu = f["gpu_peak"] is not None
    where = f"{args.device}{', bf16 autocast' if args.bf16 else ''}"
    table = "\n".join([
        f"Layer-wise AdaMerging, ViT-B/32 image encoder, {args.tasks} tasks, batch {args.batch} per task, {where}:", "",
        "| store | step s | peak RSS during adaptation MiB | process peak MiB | packed task vectors MiB |"
        + (" peak GPU memory MiB |" if gpu else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
        *(f"| {k} | {r['step_s']:.2f} | {r['adapt_peak_rss'] / 2**20:.0f} | {r['peak_rss'] / 2**20:.0f} | "
          f"{r['packed_bytes'] / 2**20:.0f} |" + (f" {r['gpu_peak'] / 2**20:.0f} |" if gpu else "") for k, r in rows.items()),
        "", f"INT4 / fp32: memory during adaptation x{q['adapt_peak_rss'] / f['adapt_peak_rss']:.2f} "
            f"(process peak x{q['peak_rss'] / f['peak_rss']:.2f}), step time x{q['step_s'] / f['step_s']:.2f}"
            + (f", peak GPU memory x{q['gpu_peak'] / f['gpu_peak']:.2f}" if gpu else ""),
        # on a GPU the memory that grows with the task count is the device's
        "", *targets(args.tasks, (q["gpu_peak"] / f["gpu_peak"]) if gpu else q["adapt_peak_rss"] / f["adapt_peak_rss"],
                     q["step_s"] / f["step_s"])])
    publish(args.out, "adamerging", table, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
