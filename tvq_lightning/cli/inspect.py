"""``tvq inspect``: what a store holds and what it costs on disk."""
from __future__ import annotations

import argparse
import json

from ..store.reader import TaskVectorStore
from ..store.summary import format_summary, summarize


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a store's (or per-task merge's) tasks, scheme, bits and size",
                       description="Tasks, scheme, bits, bytes on disk and the ratio to the fp32 checkpoints the store replaces.")
    p.add_argument("store", metavar="STORE", help="store directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..merging.output import artifact_summary, is_artifact

    if is_artifact(args.store):
        s = artifact_summary(args.store)
        text = (f"per-task merge {s['path']}\nmethod     {s['method']}\ntasks      {', '.join(s['tasks'])}\n"
                f"scales     {', '.join(f'{x:.4f}' for x in s['scales'])}\n"
                f"on disk    {s['bytes_on_disk']:,} bytes = {100 * s['ratio_to_fp32']:.2f} % of {len(s['tasks'])} fp32 models "
                f"(masks {s['mask_bytes']:,} bytes)")
        print(json.dumps(s, indent=1) if args.json else text)
        return 0
    with TaskVectorStore(args.store) as store:
        s = summarize(store)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0
