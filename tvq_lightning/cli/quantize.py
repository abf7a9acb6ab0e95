"""``tvq quantize``: build a store from fine-tuned checkpoints, or add tasks to one."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..errors import TvqError
from ..store.layout import LAYOUT_FILE, SCHEMES, StoreConfig, read_layout
from ..store.writer import quantize_to_store
from ._common import add_checkpoint_options, parse_named_paths


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize task vectors into a store (or add tasks to one)",
        description=(
            "Compute task vectors tau_t = theta_t - theta_0 key by key and store them quantized. "
            "If --out is an existing store, the named tasks are added to it with the store's own "
            "settings (scheme options, if given, must match)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pretrained", required=True, metavar="PATH", help="pre-trained weights theta_0")
    p.add_argument("--finetuned", required=True, nargs="+", metavar="NAME=PATH",
                   help="fine-tuned checkpoints, one per task")
    p.add_argument("--scheme", choices=SCHEMES, default=None,
                   help="fp32: exact task vectors; fq: quantize theta_t; tvq: quantize tau_t; "
                        "rtvq: quantized shared base + per-task offsets (default for a new store: tvq)")
    p.add_argument("--bits", type=int, default=None, help="bits per code for fq / tvq (1-8; default 4)")
    p.add_argument("--base-bits", type=int, default=None, help="RTVQ base bits (default 3)")
    p.add_argument("--offset-bits", type=int, default=None, help="RTVQ offset bits (default 2)")
    p.add_argument("--budget", type=float, default=None, metavar="BITS",
                   help="bits per quantized parameter per task; the allocator chooses the bits "
                        "(rtvq: base/offset bits; tvq: bits) minimising the sensitivity-weighted error")
    p.add_argument("--per-tensor-bits", action="store_true", default=None,
                   help="with --budget: choose the bits of every tensor separately")
    p.add_argument("--granularity", choices=("tensor", "channel", "group"), default=None,
                   help="one scale per tensor (default, the paper's), per output channel, or per group")
    p.add_argument("--group-size", type=int, default=None, help="values per group (default 128)")
    p.add_argument("--symmetric", action="store_true", default=None, help="absmax instead of min-max")
    p.add_argument("--no-error-correction", dest="error_correction", action="store_false", default=None,
                   help="RTVQ offsets against the fp32 mean instead of the quantized base")
    p.add_argument("--policy", default=None, help="which tensors are quantized: rank (default) or linear")
    p.add_argument("--rtvq-base", choices=("frozen", "recompute"), default="frozen",
                   help="adding tasks to an RTVQ store: keep its base, or recompute it over all tasks")
    p.add_argument("--out", required=True, metavar="STORE", help="store directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of adding to it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_checkpoint_options(p)
    p.set_defaults(func=run)


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(StoreConfig)}


def config_from_args(args: argparse.Namespace, base: StoreConfig) -> StoreConfig:
    """``base`` with the options the user gave explicitly."""
    given = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS and v is not None}
    if args.per_tensor_bits is None:
        given.pop("per_tensor_bits", None)
    return dataclasses.replace(base, **given)


def run(args: argparse.Namespace) -> int:
    finetuned = parse_named_paths(args.finetuned, "--finetuned")
    out = Path(args.out)
    existing = out.is_dir() and (out / LAYOUT_FILE).is_file() and not args.overwrite
    if existing:
        store_cfg = read_layout(out).config
        cfg = config_from_args(args, store_cfg)
        if cfg != store_cfg:
            raise TvqError(f"store {out} holds {store_cfg.label} task vectors; options {cfg.label} differ: drop them to add tasks with the store's settings, or choose another --out")
    else:
        cfg = config_from_args(args, StoreConfig())
    t0 = time.perf_counter()
    layout = quantize_to_store(args.pretrained, finetuned, out, cfg, prefix=args.prefix, allow_pickle=args.allow_pickle,
                               overwrite=args.overwrite, rtvq_base=args.rtvq_base, progress=not args.quiet)
    dt = time.perf_counter() - t0
    verb = "added" if existing else "stored"
    print(f"{verb} {len(finetuned)} task(s) as {layout.config.label} in {out} ({dt:.1f} s); store now holds {len(layout.tasks)} task(s)")
    return 0
