"""``tvq export``: one task's dequantized task vector, or its reconstructed fine-tuned weights."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TvqError
from ..store.export import export_task
from ._common import add_checkpoint_options


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write one task's task vector or fine-tuned weights as safetensors",
                       description="Dequantize one task of a store into an fp32 task vector, or with "
                                   "--finetuned-weights into the reconstructed fine-tuned state dict theta_0 + tau. "
                                   "Given a per-task merge artifact of `tvq merge` (EMR, TALL) as --store, write task "
                                   "NAME's merged model (needs --pretrained).")
    p.add_argument("--store", required=True, metavar="STORE")
    p.add_argument("--task", required=True, metavar="NAME")
    p.add_argument("--pretrained", metavar="PATH", help="theta_0 (needed for --finetuned-weights and FQ stores)")
    p.add_argument("--finetuned-weights", action="store_true", help="write theta_0 + tau (in theta_0's dtypes) instead of tau")
    p.add_argument("--out", required=True, metavar="PATH.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_checkpoint_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..merging.output import export_task_model, is_artifact

    if is_artifact(args.store):  # a per-task merge (EMR, TALL): task NAME's merged model
        if not args.pretrained:
            raise TvqError(f"{args.store} is a per-task merge: pass --pretrained PATH to build task {args.task!r}'s model")
        n = export_task_model(args.store, args.task, args.pretrained, args.out, overwrite=args.overwrite)
        print(f"wrote the merged model of {args.task!r} to {Path(args.out)} ({n:,} bytes)")
        return 0
    if args.finetuned_weights and not args.pretrained:
        raise TvqError("--finetuned-weights needs --pretrained PATH (the weights the task vector is added to)")
    n = export_task(args.store, args.task, args.out, pretrained=args.pretrained, finetuned_weights=args.finetuned_weights,
                    prefix=args.prefix, allow_pickle=args.allow_pickle, trust_pickle_code=args.trust_pickle_code,
                    overwrite=args.overwrite)
    what = "fine-tuned weights" if args.finetuned_weights else "task vector"
    print(f"wrote the {what} of {args.task!r} to {Path(args.out)} ({n:,} bytes)")
    return 0
