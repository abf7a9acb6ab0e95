"""``tvq inspect``: what a store holds and what it costs on disk."""
from __future__ import annotations

import argparse
import json

from ..store.reader import TaskVectorStore
from ..store.summary import format_summary, summarize
from ..store.verify import upgrade_store, verify_store


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a store's (or per-task merge's) tasks, scheme, bits and size",
                       description="Tasks, scheme, bits, bytes on disk and the ratio to the fp32 checkpoints the store replaces.")
    p.add_argument("store", metavar="STORE", help="store directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true",
                   help="check the whole store: every file present, every stored tensor's CRC-32, the layout against "
                        "the files (exit 2 naming the first problem)")
    p.add_argument("--pretrained", metavar="PATH", default=None,
                   help="with --verify: also check the layout's keys, shapes and dtypes against theta_0")
    p.add_argument("--upgrade", action="store_true",
                   help="record checksums in a store written before they existed (layout version 1); it trusts "
                        "the files as they are now")
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
    if args.upgrade:
        layout = upgrade_store(args.store)
        print(f"store {args.store}: layout version {layout.version}, checksums recorded")
    if args.verify:
        report = verify_store(args.store, pretrained=args.pretrained)
        print(json.dumps(report.to_json(), indent=1) if args.json else report.format())
        report.raise_if_bad()
        return 0
    with TaskVectorStore(args.store) as store:
        s = summarize(store)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0
