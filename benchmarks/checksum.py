"""Checksum cost: `tvq merge` with every stored tensor's CRC-32 checked on first read against `--no-verify`.

    python benchmarks/checksum.py [--workdir /tmp/tvq_bench] [--repeat 3] [--out runs/bench]

theta_0: the open_clip ViT-B-32 image encoder (random init), 8 synthetic task vectors (the stores
of benchmarks/merge.py). For task arithmetic and TIES, from a TVQ-INT4 and an fp32 store, both
variants run in their own process, alternating, and the best of ``--repeat`` runs of each is kept;
the target is a checksum cost of at most 10 % of the merge time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish, vit_b32_checkpoints, warm_page_cache  # noqa: E402
from merge import build_store, measure, tvq_merge  # noqa: E402

from tvq_lightning.store import StoreConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tvq_bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    w = args.workdir
    pre, ft_all = vit_b32_checkpoints(w, args.tasks)
    ft = dict(list(ft_all.items())[: args.tasks])
    stores = {"tvq4": build_store(pre, ft, w / f"merge_tvq4_T{args.tasks}", StoreConfig("tvq", bits=4)),
              "fp32": build_store(pre, ft, w / f"merge_fp32_T{args.tasks}", StoreConfig("fp32"))}
    out = w / "merged_checksum.safetensors"
    rows = []
    for method in ("task_arithmetic", "ties"):
        for scheme, store in stores.items():
            warm_page_cache([pre, *store.rglob("*.safetensors")])
            best = {"verify": float("inf"), "no-verify": float("inf")}
            for _ in range(args.repeat):
                for variant in best:
                    cmd = tvq_merge(pre, store, method, out) + (["--no-verify"] if variant == "no-verify" else [])
                    best[variant] = min(best[variant], measure(cmd)[0])
            cost = best["verify"] / best["no-verify"] - 1
            rows.append({"method": method, "store": scheme, "verify_s": best["verify"],
                         "no_verify_s": best["no-verify"], "cost": cost, "holds": cost <= 0.10})
            print(f"{method:>16} {scheme:>5}: verified {best['verify']:6.2f} s | --no-verify {best['no-verify']:6.2f} s | "
                  f"checksum cost {100 * cost:+5.1f} % (target <= 10 %)", flush=True)
    lines = ["| method | store | verified s | --no-verify s | checksum cost | <= 10 % |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['method']} | {r['store']} | {r['verify_s']:.2f} | {r['no_verify_s']:.2f} | {100 * r['cost']:+.1f} % | "
              f"{'yes' if r['holds'] else 'NO'} |" for r in rows]
    publish(args.out, "checksum", "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
