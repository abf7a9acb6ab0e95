"""``tvq sweep``: the reproduction sweep (see :mod:`tvq_lightning.sweep.run`)."""
from __future__ import annotations

from collections.abc import Sequence

HELP = ("build the stores of several schemes, choose each method's option on validation, evaluate every "
        "method x scheme on the test splits and write the table (resumable)")


def build_parser():
    from ..sweep.config import SweepConfig
    from .options import OptionsParser

    p = OptionsParser("tvq sweep", HELP + ". Every SweepConfig field is an option; -c FILE reads them from YAML "
                      "(configs/reproduce/), --print_config prints them.")
    p.add_options(SweepConfig, title="SweepConfig settings")
    return p


def main(argv: Sequence[str]) -> int:
    from ..sweep.config import SweepConfig
    from ..sweep.run import run_sweep
    from .options import build_dataclass

    ns = build_parser().parse(list(argv))
    report = run_sweep(build_dataclass(SweepConfig, ns))
    if not report.get("dry_run"):
        from pathlib import Path

        print((Path(ns.out) / "table.md").read_text())
    return 0
