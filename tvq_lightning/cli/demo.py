"""``tvq demo``: the main job on the embedded benchmark (see :mod:`tvq_lightning.demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune, quantize, merge, adapt and evaluate on the embedded benchmark; "
                                    "print the main table and write report.md / report.json / plots")
    p.add_argument("--out", default="runs/demo", help="output directory (built aside, then swapped in)")
    p.add_argument("--quick", action="store_true", help="three tasks, small splits, few steps (used by the tests)")
    p.add_argument("--seed", type=int, default=0, help="the data and training seed")
    p.add_argument("--clip", default=None, help="a tiny CLIP folder (config.json + weights.safetensors); "
                                                "default: the pre-trained one shipped in the package")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one DemoConfig setting (repeatable), e.g. --set finetune_steps=150 "
                        "--set tinting_epochs=500 --set budget_sensitivity=uniform")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..demo import DemoConfig, run_demo

    cfg = replace(DemoConfig.quick() if args.quick else DemoConfig(), seed=args.seed).with_overrides(args.set)
    run_demo(Path(args.out), cfg=cfg, clip_dir=args.clip, progress=not args.no_progress)
    return 0
