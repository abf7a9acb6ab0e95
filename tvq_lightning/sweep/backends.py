"""What a sweep evaluates with (:class:`~.core.Backend`).

- :class:`EmbeddedBackend`: the embedded benchmark's cached stem features and zero-shot heads (the
  demo; batched forwards on the CPU).
- :class:`ModelBackend`: a real encoder (open_clip, HF CLIP, timm, any ``nn.Module``), one head per
  task and a multi-task datamodule, evaluated by :class:`~tvq_lightning.modules.MergedEvaluation`
  through a Lightning ``Trainer`` (``accelerator`` / ``devices`` / ``precision`` as configured).
  Every evaluation is one ``Trainer`` run over all tasks: a model shared by every task, or one model
  per task (individual fine-tunes, EMR, TALL), loaded when the task's dataloader starts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .core import Models


class EmbeddedBackend:
    """The demo's evaluator (:class:`~tvq_lightning.demo.evaluate.Evaluator`) as a sweep backend."""

    def __init__(self, bench, evaluator):
        self.bench, self.ev = bench, evaluator
        self.tasks = list(bench.tasks)
        self.pretrained_path = Path(bench.pretrained_path)

    def pretrained(self) -> dict[str, Tensor]:
        return self.bench.pretrained()

    def evaluate(self, models: Models, split: str) -> dict[str, float]:
        per_task = [models(t) for t in self.tasks]
        if all(m is per_task[0] for m in per_task):      # one model for every task: one batched forward
            return self.ev.accuracy(per_task[0], split)
        return {t: self.ev.task_accuracy(m, t, split) for t, m in zip(self.tasks, per_task)}


class ModelBackend:
    """A real encoder + heads + datamodule, evaluated through Lightning (see the module docstring).

    Args:
        encoder: the encoder architecture (its weights are replaced by each evaluated model).
        pretrained_path: θ0 of the encoder (the file the stores were built from).
        heads: ``{task: head}`` (e.g. zero-shot heads from ``tvq heads``).
        datamodule: a LightningDataModule whose val / test loaders are ``tasks``, in order.
        trainer: keyword arguments of ``lightning.pytorch.Trainer`` (accelerator, devices, precision,
            limit_val_batches, ...).
        task_types: each task's registered task type (``classification`` for the CLIP suites).
    """

    def __init__(self, encoder: nn.Module, pretrained_path: str | Path, heads: Mapping[str, nn.Module],
                 datamodule: Any, trainer: Mapping[str, Any] | None = None,
                 tasks: Sequence[str] | None = None, task_types: str | dict[str, str] = "classification"):
        from ..store.checkpoints import load_state_dict

        self.encoder = encoder
        self.pretrained_path = Path(pretrained_path)
        self.tasks = list(tasks if tasks is not None else heads)
        self.heads = dict(heads)
        self.datamodule = datamodule
        self.trainer_kwargs = dict(trainer or {})
        self.task_types = task_types
        self._theta0 = load_state_dict(self.pretrained_path)
        own = {k: v.detach() for k, v in encoder.state_dict().items()}
        missing = [k for k in self._theta0 if k not in own]
        if missing:
            from ..errors import TvqError

            raise TvqError(f"{self.pretrained_path}: key {missing[0]!r} is not in the encoder ({len(missing)} such keys); "
                           f"give the encoder these weights belong to, or the checkpoint's prefix (e.g. model.visual.)")
        self._full = {**own, **self._theta0}    # θ0; keys the stores do not hold stay the encoder's

    def pretrained(self) -> dict[str, Tensor]:
        return dict(self._theta0)

    def _trainer(self):
        import lightning.pytorch as pl

        kw = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              "enable_progress_bar": False, "devices": 1, **self.trainer_kwargs}
        return pl.Trainer(**kw)

    def _full_model(self, model: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {**self._full, **{k: v for k, v in model.items() if k in self._full}}

    def _run(self, merged: Mapping[str, Any], split: str) -> dict[str, float]:
        from ..modules.evaluate import MergedEvaluation

        module = MergedEvaluation(self.encoder, tasks=self.tasks, heads=self.heads, merged=merged,
                                  task_types=self.task_types)
        trainer = self._trainer()
        with torch.no_grad():
            if split == "val":
                trainer.validate(module, datamodule=self.datamodule, verbose=False)
                res = module.val_results
            else:
                trainer.test(module, datamodule=self.datamodule, verbose=False)
                res = module.results
        percent = set(module.percent_metrics)
        return {t: float(res[t]) * (100.0 if module.task_types[t].main_metric in percent else 1.0) for t in self.tasks}

    def evaluate(self, models: Models, split: str) -> dict[str, float]:
        per_task = [models(t) for t in self.tasks]
        if all(m is per_task[0] for m in per_task):     # one model for every task
            return self._run(self._full_model(per_task[0]), split)
        return self._run({t: self._full_model(m) for t, m in zip(self.tasks, per_task)}, split)
