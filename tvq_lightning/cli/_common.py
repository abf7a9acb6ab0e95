"""Argument helpers shared by the store commands."""
from __future__ import annotations

import argparse

from ..errors import TvqError


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default=None,
                   help="keep only keys under this prefix and strip it (e.g. model. or model.encoder. for Lightning .ckpt)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept checkpoints that are pickled modules (task_vectors' finetuned.pt); they load through "
                        "an allow-list of classes and no code from the file runs")
    p.add_argument("--trust-pickle-code", action="store_true",
                   help="unpickle checkpoints with plain torch.load, which RUNS CODE FROM THE FILE (needs its classes "
                        "importable); only for files you trust that --allow-pickle refuses")


def parse_named_paths(items: list[str], flag: str) -> dict[str, str]:
    """``["cars=a.pt", "svhn=b.pt"]`` -> ``{"cars": "a.pt", "svhn": "b.pt"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TvqError(f"{flag} {item!r} is not NAME=PATH (e.g. {flag} cars=runs/cars/finetuned.safetensors)")
        if name in out:
            raise TvqError(f"task {name!r} is given twice in {flag}; every task needs its own name")
        out[name] = path
    return out
