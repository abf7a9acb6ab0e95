"""``tvq demo``: the main job on the embedded default (see :mod:`tvq_lightning.demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a generated model and print the storage table")
    p.add_argument("--out", default="runs/demo", help="output directory (replaced)")
    p.add_argument("--quick", action="store_true", help="fewer tasks, smaller model (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(Path(args.out), quick=args.quick, seed=args.seed)
    return 0
