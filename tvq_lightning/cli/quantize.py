"""``tvq quantize``: build a store from fine-tuned checkpoints, or add tasks to one."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from ..errors import TvqError
from ..quant.config import GRANULARITIES
from ..quant.policy import list_policies
from ..store.layout import LAYOUT_FILE, StoreConfig, read_layout
from ..store.writer import quantize_to_store
from ._common import parse_named_paths
from .options import OptionsParser, build_dataclass, parse_two_pass

HELP = "quantize task vectors into a store (or add tasks to one)"
DESCRIPTION = (
    "Compute task vectors tau_t = theta_t - theta_0 key by key and store them quantized. If --out is an "
    "existing store, the named tasks are added to it with the store's own settings (the defaults shown "
    "are then the store's; settings given must match them). -c FILE reads these options from YAML; "
    "--print_config prints them as YAML that re-runs as is.")


def scheme_names() -> list[str]:
    """The registered quantization schemes (the fixed list where no registry exists)."""
    try:
        from ..quant import list_schemes
    except ImportError:
        from ..store.layout import SCHEMES

        return list(SCHEMES)
    return list(list_schemes())


CHOICES = {"scheme": scheme_names, "granularity": lambda: GRANULARITIES, "policy": list_policies}


def _store_dir(ns: Namespace | None) -> Path | None:
    """``--out`` when it is an existing store that the tasks are added to (no ``--overwrite``)."""
    if ns is None or not ns.get("out") or ns.get("overwrite"):
        return None
    out = Path(ns.out)
    return out if (out / LAYOUT_FILE).is_file() else None


def build_parser(first: Namespace | None = None) -> OptionsParser:
    """The options; after a first pass (``first``), an existing ``--out`` store's settings are the defaults."""
    p = OptionsParser("tvq quantize", DESCRIPTION)
    required = first is not None
    p.option("pretrained", str, help="pre-trained weights theta_0 (safetensors, .pt/.bin, Lightning .ckpt)",
             required=required, metavar="PATH")
    p.option("finetuned", str, nargs="+", required=required, metavar="NAME=PATH",
             help="fine-tuned checkpoints, one per task")
    p.option("out", str, required=required, metavar="STORE", help="store directory")
    store = _store_dir(first)
    p.add_options(StoreConfig, choices=CHOICES, title="store settings (StoreConfig)",
                  defaults=None if store is None else asdict(read_layout(store).config))
    p.add_options(quantize_to_store, only=("rtvq_base", "overwrite", "prefix", "pretrained_prefix", "finetuned_prefix",
                                           "allow_pickle", "trust_pickle_code"), title="writing")
    p.option("quiet", bool, False, "no progress bar")
    return p


def main(argv: Sequence[str]) -> int:
    ns = parse_two_pass(argv, build_parser)
    return run(ns)


def run(ns: Namespace | Any) -> int:
    finetuned = parse_named_paths(ns.finetuned, "--finetuned")
    out = Path(ns.out)
    store = _store_dir(ns)
    cfg = build_dataclass(StoreConfig, ns)
    if store is not None:
        store_cfg = read_layout(store).config
        if cfg != store_cfg:
            raise TvqError(f"store {out} holds {store_cfg.label} task vectors; options {cfg.label} differ: drop them to add tasks with the store's settings, or choose another --out")
    t0 = time.perf_counter()
    layout = quantize_to_store(ns.pretrained, finetuned, out, cfg, prefix=ns.prefix,
                               pretrained_prefix=ns.pretrained_prefix, finetuned_prefix=ns.finetuned_prefix,
                               allow_pickle=ns.allow_pickle, trust_pickle_code=ns.trust_pickle_code,
                               overwrite=ns.overwrite, rtvq_base=ns.rtvq_base, progress=not ns.quiet)
    dt = time.perf_counter() - t0
    verb = "added" if store is not None else "stored"
    print(f"{verb} {len(finetuned)} task(s) as {layout.config.label} in {out} ({dt:.1f} s); store now holds {len(layout.tasks)} task(s)")
    return 0
