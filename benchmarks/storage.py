"""Storage benchmark: bytes on disk and quantization time of every scheme on ViT-B/32.

    python benchmarks/storage.py [--tasks 8] [--workdir /tmp/tvq_bench] [--repeat 3]

theta_0 is the open_clip ViT-B-32 image encoder (random init, no download) and the 8 tasks are
synthetic fine-tunes. For each scheme it prints the bytes on disk, the ratio to the 8 fp32
checkpoints the store replaces, the theoretical ratio (bits alone), and the time of
``quantize_to_store`` (what ``tvq quantize`` runs, without interpreter start-up) next to the
I/O floor: the time of just loading the checkpoints (safetensors ``load_file``) and subtracting.
Writes ``storage.md``, ``storage.json`` and ``storage.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish, timed, vit_b32_checkpoints, warm_page_cache  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store  # noqa: E402
from tvq_lightning.store.summary import summarize  # noqa: E402

SCHEMES = {
    "fp32": StoreConfig("fp32"),
    "fq8": StoreConfig("fq", bits=8),
    "fq4": StoreConfig("fq", bits=4),
    "tvq8": StoreConfig("tvq", bits=8),
    "tvq4": StoreConfig("tvq", bits=4),
    "tvq3": StoreConfig("tvq", bits=3),
    "tvq2": StoreConfig("tvq", bits=2),
    "rtvq_b3o2": StoreConfig("rtvq", base_bits=3, offset_bits=2),
    "budget": StoreConfig("rtvq", budget=2.5, per_tensor_bits=True),
}


def io_floor(pre_path: Path, ft: dict[str, Path]) -> None:
    """What any tool must do: load theta_0 and each fine-tuned checkpoint, subtract."""
    pre = load_file(pre_path)
    for p in ft.values():
        f = load_file(p)
        for k, v in pre.items():
            _ = f[k] - v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tvq_bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    args = ap.parse_args(argv)
    pre_path, ft = vit_b32_checkpoints(args.workdir, args.tasks)
    warm_page_cache([pre_path, *ft.values()])
    floor, _ = timed(lambda: io_floor(pre_path, ft), args.repeat)
    rows = {}
    for name in args.schemes:
        cfg = SCHEMES[name]
        store = args.workdir / f"store_{name}"

        def run():
            quantize_to_store(pre_path, ft, store, cfg, progress=False)

        # deleting the previous run's store (not part of quantizing) is left out of the timing
        secs, _ = timed(run, args.repeat, setup=lambda: shutil.rmtree(store, ignore_errors=True))
        with TaskVectorStore(store) as s:
            summ = summarize(s)
        rows[name] = {"scheme": cfg.label, "bytes": summ["bytes_on_disk"], "ratio_to_fp32": summ["ratio_to_fp32"],
                      "theoretical_ratio": summ["theoretical_ratio_quantized_only"], "bits_per_param": summ["bits_per_param"],
                      "quantize_s": secs, "io_floor_s": floor, "time_vs_floor": secs / floor}
        r = rows[name]
        print(f"{cfg.label:>16}: {r['bytes']:>13,} B  {100 * r['ratio_to_fp32']:6.2f} % (theory {100 * r['theoretical_ratio']:6.2f} %)"
              f"  quantize {secs:6.2f} s  floor {floor:5.2f} s  x{r['time_vs_floor']:.2f}", flush=True)
        shutil.rmtree(store, ignore_errors=True)
    publish(args.out, "storage", format_table(rows, args.tasks), {"tasks": args.tasks, "rows": rows})
    plot(rows, args.out / "storage.png")
    return 0


def format_table(rows: dict, tasks: int) -> str:
    lines = [f"| scheme | bits/param/task | bytes on disk | % of {tasks} fp32 ckpts | theory % | quantize s | I/O floor s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        lines.append(f"| {r['scheme']} | {r['bits_per_param']:.3f} | {r['bytes']:,} | {100 * r['ratio_to_fp32']:.2f} | "
                     f"{100 * r['theoretical_ratio']:.2f} | {r['quantize_s']:.2f} | {r['io_floor_s']:.2f} | {r['time_vs_floor']:.2f} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["scheme"] for r in rows.values()]
    ax.bar(names, [100 * r["ratio_to_fp32"] for r in rows.values()], color="#4C72B0")
    ax.set_ylabel("% of fp32 checkpoints")
    ax.set_yscale("log")
    ax.set_title("Bytes on disk per scheme (ViT-B/32 image encoder)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
