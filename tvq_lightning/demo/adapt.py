"""Test-time adaptation runs of the demo: AdaMerging (task- and layer-wise) and Model Tinting++.

Each run is a ``Trainer.fit`` of the project's LightningModule on the unlabelled test features of
every task (a ``CombinedLoader``), with the task vectors packed from the store, then a
``Trainer.test`` for the per-task accuracy (the module's torchmetrics, exact counts).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.multitask import TensorTasks
from ..modules.adamerging import AdaMerging
from ..modules.tinting import Tinting
from .bench import Bench
from ..sweep.core import result
from .finetune import quiet_trainer

ADAPTIVE = ("adamerging_task", "adamerging_layer", "tinting")


def _module(method: str, bench: Bench, store: Path, out: Path):
    cfg = bench.cfg
    common = dict(tasks=bench.tasks, heads=bench.heads, pretrained=str(bench.pretrained_path),
                  coefficients_out=str(out / f"{method}.coefficients.json"))
    if method == "tinting":
        steps = cfg.tinting_epochs * (len(bench.tasks) if cfg.tinting_step_mode == "task" else 1)
        return Tinting(bench.top(), str(store), lr=cfg.tinting_lr, granularity="layer", confidence_sampling=True,
                       step_mode=cfg.tinting_step_mode, seed=cfg.seed, **common), steps
    granularity = "task" if method == "adamerging_task" else "layer"
    return AdaMerging(bench.top(), str(store), granularity=granularity, lr=cfg.adamerging_lr, **common), \
        cfg.adamerging_steps


def adapt(method: str, bench: Bench, store: Path, out: Path) -> dict:
    """One adaptation run on ``store``; its test accuracy as a report cell."""
    module, steps = _module(method, bench, store, out)
    dm = TensorTasks(bench.data, bench.num_classes, batch_size=bench.cfg.adapt_batch, eval_batch_size=1024)
    torch.manual_seed(bench.cfg.seed)
    quiet_trainer(steps).fit(module, dm)
    quiet_trainer(steps).test(module, dm, verbose=False)
    lam = module.lambdas().detach()
    return result({t: 100.0 * module.results[t] for t in bench.tasks},
                  coefficients_mean=float(lam.mean()), coefficients_range=[float(lam.min()), float(lam.max())])
