"""The in-memory merge the reference repositories run (for comparison in merge.py; not the library).

It loads every fine-tuned checkpoint fully into memory, forms all task vectors, and merges them:
task arithmetic sums them; TIES flattens each into a row of a T x P matrix, finds each row's
k-th value, elects signs and merges (the task_vectors / ties-merging / AdaMerging code path).

    python benchmarks/reference_merge.py --method ties --pretrained P --finetuned A B ... --out M
"""
from __future__ import annotations

import argparse
import math

import torch
from safetensors.torch import load_file, save_file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=("task_arithmetic", "ties"), required=True)
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--finetuned", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scaling", type=float, default=0.3)
    ap.add_argument("--k", type=float, default=0.2)
    args = ap.parse_args(argv)
    pre = {k: v.clone() for k, v in load_file(args.pretrained).items()}
    fts = [{k: v.clone() for k, v in load_file(p).items()} for p in args.finetuned]   # all models in memory
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    taus = [{k: ft[k] - pre[k] for k in keys} for ft in fts]
    if args.method == "task_arithmetic":
        merged = {k: pre[k] + args.scaling * sum(t[k] for t in taus) for k in keys}
    else:
        flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus])  # T x P
        d = flat.shape[1]
        kth = flat.abs().kthvalue(d - math.floor(args.k * d), dim=1, keepdim=True).values
        flat = flat * (flat.abs() >= kth)
        sign = torch.sign(flat.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        keep = torch.where(sign > 0, flat > 0, flat < 0)
        mv = (flat * keep).sum(0) * args.scaling
        merged, off = {}, 0
        for k in keys:
            n = pre[k].numel()
            merged[k] = pre[k] + mv[off:off + n].view(pre[k].shape)
            off += n
    save_file({k: merged.get(k, v).contiguous() for k, v in pre.items()}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
