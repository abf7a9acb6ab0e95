"""Test-time adaptation of the dense merge directly on the packed task vectors.

- ``adamerging_layer``: layer-wise AdaMerging (one coefficient per store key and task); depth and
  normals have no entropy, so their objective is the loss against each expert's cached predictions
  (``adapts_to_expert``), segmentation's the pixel entropy;
- ``tinting``: Model Tinting with the task-specific layer ``cfg.tint`` (``"head"``: the whole
  task decoder, initialised from the fine-tuned one) trained with the layer-wise coefficients against
  each expert's (θ0 + τ_t, its decoder) cached predictions; Tinting++'s confidence-based sampling
  per pixel when ``cfg.tinting_confidence_sampling``.

Both are the project's LightningModules (``Trainer.fit`` on the unlabelled test images of
``SceneTasks``), the BatchNorm statistics policy ``cfg.bn_stats``, coefficients initialised at task
arithmetic's validation λ. The adapted encoder (and tinted decoders) are then scored by the same
:class:`~.evaluate.DenseEvaluator` as every other row.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ...modules.adamerging import AdaMerging
from ...modules.tinting import Tinting
from ..finetune import quiet_trainer
from .evaluate import DenseEvaluator, Metrics, cell

ADAPTIVE = ("adamerging_layer", "tinting")


def _module(method: str, ev: DenseEvaluator, store: Path, out: Path, init: float):
    bench, cfg = ev.bench, ev.bench.cfg
    common = dict(tasks=bench.tasks, heads={t: copy.deepcopy(h) for t, h in bench.heads.items()},
                  pretrained=str(bench.pretrained_path), granularity="layer", init=float(init),
                  task_types={t: t for t in bench.tasks}, bn_stats=cfg.bn_stats,
                  coefficients_out=str(out / f"{method}.coefficients.json"))
    if method == "tinting":
        return Tinting(bench.encoder(), str(store), tint=cfg.tint, confidence_sampling=cfg.tinting_confidence_sampling,
                       lr=cfg.tinting_lr,
                       step_mode="joint", seed=cfg.seed, **common), cfg.tinting_steps
    return AdaMerging(bench.encoder(), str(store), lr=cfg.adamerging_lr, **common), cfg.adamerging_steps


def adapt(method: str, ev: DenseEvaluator, store: Path, out: Path, base: Metrics, init: float,
          keep: int = 0) -> tuple[dict, dict]:
    """One adaptation run on ``store``: its test cell (Δm against ``base``) and kept predictions."""
    cfg = ev.bench.cfg
    module, steps = _module(method, ev, store, out, init)
    torch.manual_seed(cfg.seed)
    quiet_trainer(steps).fit(module, ev.bench.datamodule(batch_size=cfg.adapt_batch))
    module.eval()
    params = module.merged_state_dict()   # with the policy's BatchNorm statistics
    res, preds = ev.metrics(lambda t: params, "test", heads=dict(module.model.heads.items()), keep=keep)
    lam = module.lambdas().detach()
    return cell(res, ev, base, steps=steps, coefficients_mean=float(lam.mean()),
                coefficients_range=[float(lam.min()), float(lam.max())]), preds
