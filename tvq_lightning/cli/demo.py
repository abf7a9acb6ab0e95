"""``tvq demo``: the main job on the embedded benchmark (see :mod:`tvq_lightning.demo`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal, Optional

from jsonargparse import Namespace

from .options import OptionsParser, build_dataclass, parse_two_pass

HELP = ("fine-tune, quantize, merge, adapt and evaluate on the embedded benchmark; "
        "print the main table and write report.md / report.json / plots")


def build_parser(first: Namespace | None = None) -> OptionsParser:
    """``run_demo``'s options and one per :class:`DemoConfig` field (defaults: ``DemoConfig.quick()``'s with ``--quick``)."""
    from ..demo import DemoConfig, run_demo

    p = OptionsParser("tvq demo", HELP + ". Every DemoConfig field is an option (--finetune_steps 150); "
                      "-c FILE reads them from YAML, --print_config prints them.")
    p.add_options(run_demo, only=("out", "quick", "clip_dir", "progress"), aliases={"clip_dir": ("--clip",)},
                  types={"out": str, "clip_dir": Optional[str]}, help={
        "out": "output directory (built aside, then swapped in)",
        "quick": "three tasks, small splits, few steps (used by the tests); the defaults below become DemoConfig.quick()'s",
        "clip_dir": "a tiny CLIP folder (config.json + weights.safetensors); default: the one shipped in the package",
        "progress": "progress bars"})
    p.option("suite", Literal["all", "classification", "dense"], "all", "which benchmarks: all (classification, then "
             "dense), classification, or dense (rendered scenes; its settings are DenseDemoConfig's, "
             "DenseDemoConfig.quick()'s with --quick)")
    p.option("set", str, [], "change DemoConfig settings as KEY=VALUE (sequences comma-separated), e.g. "
             "--set finetune_steps=150 tinting_epochs=500 budget_sensitivity=uniform", nargs="+", action="extend",
             metavar="KEY=VALUE")
    p.option("dense_set", str, [], "change DenseDemoConfig settings (the dense suite) as KEY=VALUE, e.g. "
             "--dense_set finetune_steps=200 tinting_steps=80", nargs="+", action="extend", metavar="KEY=VALUE")
    base = DemoConfig.quick() if first is not None and first.get("quick") else DemoConfig()
    p.add_options(DemoConfig, defaults=asdict(base), title="DemoConfig settings")
    return p


def main(argv: Sequence[str]) -> int:
    from ..demo import DemoConfig, run_demo

    ns = parse_two_pass(argv, build_parser)
    from ..demo.dense import DenseDemoConfig
    from .options import apply_overrides

    cfg = build_dataclass(DemoConfig, ns).with_overrides(ns.set)
    dense = DenseDemoConfig.quick() if ns.quick else DenseDemoConfig()
    dense = apply_overrides(dense, ns.dense_set, exclude=("adapt_runs",))
    run_demo(ns.out, quick=bool(ns.quick), cfg=cfg, clip_dir=ns.clip_dir, progress=ns.progress, suite=ns.suite,
             dense_cfg=dense)
    return 0
