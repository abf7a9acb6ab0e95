"""``tvq sweep``: build the stores (once), evaluate every cell (resumable), write the table.

Steps: (1) the stores of ``schemes`` not given in ``stores`` are built from θ0 and the fine-tuned
checkpoints under ``OUT/stores/<scheme>`` (a store already there with the same tasks and settings is
kept); (2) the backend is set up (the encoder with θ0, the heads, the datamodule; or the embedded
benchmark); (3) :func:`~.core.run_cells` evaluates individual models and every method × scheme, each
cell saved under ``OUT/cells`` as soon as it is done; (4) ``results.json``, ``table.md`` and
``table.png`` are written.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import TvqError
from .config import SweepConfig
from .core import CellCache, run_cells
from .table import write_outputs


def _existing_store(path: Path, tasks: list[str], scheme_cfg) -> bool:
    from ..store.layout import LAYOUT_FILE, read_layout

    if not (path / LAYOUT_FILE).is_file():
        return False
    layout = read_layout(path)
    return sorted(layout.tasks) == sorted(tasks) and layout.config == scheme_cfg


def build_stores(cfg: SweepConfig, out: Path, show: bool) -> dict[str, Path]:
    """``{scheme: store dir}``: the given ones, and the others built from the fine-tuned checkpoints."""
    from ..demo.config import SCHEMES
    from ..store.writer import quantize_to_store

    stores = {s: Path(p) for s, p in cfg.stores.items() if s in cfg.schemes}
    for s, p in stores.items():
        if not p.is_dir():
            raise TvqError(f"sweep stores: {s}={p} is not a store directory; build it with tvq quantize or drop it")
    todo = [s for s in cfg.schemes if s not in stores]
    for scheme in tqdm(todo, desc="stores", disable=not show or not todo, file=sys.stderr):
        path = out / "stores" / scheme
        if not _existing_store(path, list(cfg.finetuned), SCHEMES[scheme]):
            quantize_to_store(cfg.pretrained, dict(cfg.finetuned), path, SCHEMES[scheme], prefix=cfg.prefix,
                              pretrained_prefix=cfg.pretrained_prefix, allow_pickle=cfg.allow_pickle,
                              overwrite=path.exists(), progress=False)
        stores[scheme] = path
    return {s: stores[s] for s in cfg.schemes}


def _import(class_path: str) -> Any:
    mod, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        raise TvqError(f"sweep data: cannot import {class_path!r}; give a full path like 'package.module.Class'") from None


def sweep_tasks(cfg: SweepConfig) -> list[str]:
    """The tasks: the fine-tuned checkpoints' names, else the given FP32 store's."""
    if cfg.finetuned:
        return list(cfg.finetuned)
    from ..store.reader import TaskVectorStore

    st = TaskVectorStore(cfg.stores["fp32"])
    tasks = list(st.tasks)
    st.close()
    return tasks


def check_checkpoints(cfg: SweepConfig) -> None:
    """Open θ0 and every fine-tuned checkpoint (headers only where the format allows) with their
    prefixes, and check the keys agree: what the dry run does instead of building stores."""
    from ..store.sources import check_compatible, floating_keys, open_source

    pre_prefix = cfg.pretrained_prefix if cfg.pretrained_prefix is not None else cfg.prefix
    pre = open_source("pretrained", cfg.pretrained, prefix=pre_prefix, allow_pickle=cfg.allow_pickle)
    keys = floating_keys(pre)
    for task, path in cfg.finetuned.items():
        ft = open_source(task, path, prefix=cfg.prefix, allow_pickle=cfg.allow_pickle)
        check_compatible(keys, ft, pre)
        ft.release()
    pre.release()


def model_backend(cfg: SweepConfig, stores: dict[str, Path] | None):
    """The encoder (θ0 loaded), the heads of the sweep's tasks and the datamodule."""
    from ..models.encoders import create_encoder
    from ..models.heads import ClassificationHead
    from .backends import ModelBackend

    tasks = sweep_tasks(cfg)
    enc_args = dict(cfg.encoder)
    encoder = create_encoder(enc_args.pop("kind"), **enc_args)
    heads = {}
    for t in tasks:
        path = Path(cfg.heads_dir) / f"{t}.safetensors"
        if not path.is_file():
            raise TvqError(f"sweep heads_dir: {path} is missing; build the heads with tvq heads (or import them)")
        heads[t] = ClassificationHead.load(path)
    cls, init = _import(cfg.data["class_path"]), dict(cfg.data.get("init_args", {}))
    try:
        datamodule = cls(**{**init, "tasks": tasks})
    except TypeError as e:
        raise TvqError(f"sweep data: {cfg.data['class_path']} does not take these init_args ({e}); check them") from None
    return ModelBackend(encoder, _theta0(cfg), heads, datamodule, trainer=cfg.trainer, tasks=tasks)


def _theta0(cfg: SweepConfig) -> Path:
    """θ0 as a safetensors file with the stores' keys (converted once into OUT when it is not one)."""
    from ..store.checkpoints import open_checkpoint
    from ..store.st_stream import save_safetensors

    src = Path(cfg.pretrained)
    prefix = cfg.pretrained_prefix if cfg.pretrained_prefix is not None else cfg.prefix
    if src.suffix == ".safetensors" and not prefix:
        return src
    dst = Path(cfg.out) / "pretrained.safetensors"
    if not dst.is_file():
        with open_checkpoint(src, prefix=prefix, allow_pickle=cfg.allow_pickle) as sd:
            save_safetensors({k: sd[k].contiguous() for k in sd}, dst)
    return dst


def embedded_backend(cfg: SweepConfig, out: Path, show: bool, stores: dict[str, Path] | None):
    """The demo's benchmark (and, when no stores are given, the demo's fine-tuning that writes them)."""
    from ..demo.bench import prepare
    from ..demo.config import DemoConfig
    from ..demo.evaluate import Evaluator
    from .backends import EmbeddedBackend

    opts = dict(cfg.demo)
    quick = bool(opts.pop("quick", False))
    dcfg = DemoConfig.quick(**opts) if quick else DemoConfig(**opts)
    bench = prepare(dcfg, out)
    if stores is None:
        from ..demo.finetune import build_joint_stores, finetune_task

        stores = {s: out / "stores" / s for s in cfg.schemes}
        for task in tqdm(bench.tasks, desc="finetune", disable=not show, file=sys.stderr):
            finetune_task(bench, task, stores)
        build_joint_stores(bench, stores)
    return EmbeddedBackend(bench, Evaluator(bench)), stores


def run_sweep(cfg: SweepConfig) -> dict:
    """Run the sweep (see the module docstring); returns ``results.json``'s content."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    show = cfg.progress
    plan = cfg.plan()
    cells = [(m, s) for s in cfg.schemes for m in plan.methods if s in plan.all_methods_schemes or m == "task_arithmetic"]
    if cfg.dry_run:
        if cfg.backend == "model":
            check_checkpoints(cfg)
            tasks = model_backend(cfg, None).tasks
        else:
            tasks = list(cfg.demo.get("tasks") or [])
        stores = {s: cfg.stores.get(s, str(out / "stores" / s)) for s in cfg.schemes}
        print(f"dry run: {len(tasks)} tasks ({', '.join(tasks)}); stores "
              f"{', '.join(f'{s}={p}' for s, p in stores.items())}; {len(cells)} method cells + "
              f"{len(stores)} individual rows")
        return {"dry_run": True, "tasks": tasks, "cells": [f"{m}/{s}" for m, s in cells]}
    if cfg.backend == "embedded":
        given = {s: Path(p) for s, p in cfg.stores.items()} if cfg.stores else None
        backend, stores = embedded_backend(cfg, out, show, given)
        stores = {s: Path(stores[s]) for s in cfg.schemes}
    else:
        stores = build_stores(cfg, out, show)
        backend = model_backend(cfg, stores)
    bar = tqdm(total=len(cells), desc="sweep (λ on validation)", disable=not show, file=sys.stderr)
    results = run_cells(stores, backend, plan, CellCache(out / "cells"), progress=lambda _: bar.update(1))
    bar.close()
    report = {"tasks": backend.tasks, "results": results, "stores": {s: str(p) for s, p in stores.items()},
              "config": asdict(cfg)}
    write_outputs(report, stores, out)
    return report
