"""``tvq heads``: build (or reuse) the zero-shot classification heads of catalog and custom tasks."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, Literal

from jsonargparse import Namespace

from ..models.zeroshot_build import HeadsConfig, build_heads_detailed
from .options import OptionsParser, _docs, build_dataclass

HELP = "build the zero-shot heads of tasks from a CLIP text tower (cached per task)"
DESCRIPTION = (
    "For each task, fill every prompt template with every class name, encode them with the CLIP text "
    "tower, average the normalised embeddings per class and write the head (rows scaled by the model's "
    "logit scale) to OUT/<task>.safetensors. Tasks are catalog names (the 20 CLIP tasks of the merging "
    "literature; --suite 8|14|20 names a whole suite) or JSON files with 'classnames' and 'templates'. "
    "A head whose model, class names and templates are unchanged is reused; --overwrite rebuilds all. "
    "-c FILE reads these options from YAML; --print_config prints them as YAML that re-runs as is.")

SUITE_CHOICES = Literal["8", "14", "20"]


def build_parser() -> OptionsParser:
    p = OptionsParser("tvq heads", DESCRIPTION)
    names = [f.name for f in fields(HeadsConfig)]
    p.add_options(HeadsConfig, only=names[:1], defaults={"out": None}, required=("out",))
    # one value or several (a sequence type would need a one-element list written as [NAME])
    p.option("tasks", str, None, _docs(HeadsConfig)["tasks"], nargs="+", metavar="TASK", aliases=("--task",))
    p.add_options(HeadsConfig, only=names[2:], types={"suite": SUITE_CHOICES})
    return p


def main(argv: Sequence[str]) -> int:
    return run(build_parser().parse(argv))


def run(ns: Namespace | Any) -> int:
    cfg = build_dataclass(HeadsConfig, ns)
    cfg = replace(cfg, tasks=tuple(cfg.tasks or ()))
    t0 = time.perf_counter()
    results = build_heads_detailed(cfg)
    for r in results:
        print(f"{r.status:8s} {r.path.stem} ({r.task.num_classes} classes, {len(r.task.templates)} templates): {r.path}")
    counts = {s: sum(r.status == s for r in results) for s in ("built", "rebuilt", "reused")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"{len(results)} head(s) in {cfg.out}: {summary} ({time.perf_counter() - t0:.1f} s)")
    return 0
