"""Evaluate a merged model on T tasks: ``Trainer.test(MergedEvaluation(...), datamodule=dm)``.

Where the merged encoder comes from (exactly one):

- ``store`` + ``method`` (+ ``method_options``, ``pretrained``): merged with any registered merger
  (:func:`~..merging.engine.merge_state_dict`, streamed key by key). Per-task methods (EMR, TALL)
  are written to a temporary per-task artifact and evaluated as below.
- ``merged``: a merged state dict (in memory, or a file from ``tvq merge --out X.safetensors``), or a per-task
  artifact directory (``tvq merge --out DIR`` for EMR / TALL): then test dataloader i is evaluated
  with task i's model, loaded into the encoder when dataloader i starts (one model in memory).
- ``coefficients`` + ``store``: AdaMerging coefficients (a file from
  :meth:`~.adamerging.AdaMerging.save_coefficients`); the merge is the one AdaMerging's own test
  uses (packed task vectors, :func:`~..adapt.merge_fn.merged_params`), so the accuracy equals the
  trained run's exactly; nothing is trained.

BatchNorm statistics (``bn_stats``; docs/algorithms.md §6, :mod:`~..merging.bn_stats`): ``"merged"``
(the default: merged like any key), ``"pretrained"`` (θ0's), ``"mean"`` (θ0 + mean_t τ_t, the
experts' mean: the recommended policy for dense encoders) or ``"recompute"`` (re-estimated with
the merged weights on ``bn_batches`` batches of every task's training images at the start of
each evaluation; not for per-task merges).

Metrics: each task's task-type metrics (classification: one micro ``MulticlassAccuracy``), all-reduced
under DDP, logged as ``test/<metric>/<task>`` and ``test/<metric>/avg`` (``test/acc/...``);
``self.results`` keeps the main metric per task after the epoch. ``Trainer.predict`` returns, per
batch of predict loader i (task i), ``{"task": name, "preds": ...}`` (the task type's
prediction: labels for classification). The caller's ``encoder`` is never modified: weights are
loaded into a copy.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..adapt.merge_fn import base_tensors, merged_params
from ..adapt.packed import PackedTaskVectors
from ..errors import TvqError
from ..merging.bn_stats import (apply_bn_policy, bn_stat_keys, check_bn_policy, load_bn_statistics,
                                recompute_from_datamodule, store_bn_statistics)
from ..merging.engine import merge_state_dict, plan_merge
from ..merging.methods.ties import TiesConfig
from ..merging.output import is_artifact, read_artifact, task_model_tensors, write_per_task
from ..merging.registry import create_merger
from ..models.multitask import MultiTaskModel
from ..store.checkpoints import load_state_dict
from ..store.reader import TaskVectorStore
from ..tasks import resolve_task_types
from ._multitask_eval import MultiTaskEvalMixin, prepare_encoder, resolve_heads
from .adamerging import read_coefficients


class MergedEvaluation(MultiTaskEvalMixin, pl.LightningModule):
    """Per-task accuracy of a merged encoder (see the module docstring for the sources).

    Args:
        encoder: the encoder architecture holding theta_0 (or pass ``pretrained``).
        tasks: the tasks, in test-dataloader order (default: the store's, the artifact's, or the
            heads dict's).
        heads / heads_dir: the per-task heads (dict or ``<task>.safetensors`` files).
        store, pretrained, method, method_options: merge with a registered method.
        merged: a merged state dict (a file, or in memory), a per-task artifact directory, or
            ``{task: state dict}`` (one model per task, in memory: each is loaded whole).
        coefficients: an AdaMerging coefficient file (needs ``store``).
        per_task: expect a per-task source (EMR / TALL); None: detect it.
        task_types: the task type of every task (a registered name, e.g. ``classification``), or
            ``{task: name}`` (tasks left out are classification).
        bn_stats: the BatchNorm statistics policy (merged / pretrained / mean / recompute).
        bn_batches: "recompute": batches of training images per task.
    """

    def __init__(self, encoder: nn.Module, tasks: list[str] | None = None, heads: dict[str, nn.Module] | None = None,
                 heads_dir: str | None = None, store: str | None = None, pretrained: str | None = None,
                 method: str | None = None, method_options: dict | None = None, merged: str | Mapping[str, Tensor] | None = None,
                 coefficients: str | None = None, per_task: bool | None = None,
                 task_types: str | dict[str, str] = "classification", bn_stats: str = "merged", bn_batches: int = 20):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "heads"] + (["merged"] if isinstance(merged, Mapping) else []))
        self._bn = check_bn_policy(bn_stats)
        self._bn_fixed: dict[str, Tensor] | None = None   # per-task artifacts: the statistics of every task model
        given = [n for n, v in (("method", method), ("merged", merged), ("coefficients", coefficients)) if v is not None]
        if len(given) != 1:
            raise TvqError("pass exactly one of method (with store), merged (a file or artifact) or coefficients (with store); "
                           f"got {', '.join(given) or 'none'}")
        if (method is not None or coefficients is not None) and store is None:
            raise TvqError(f"{given[0]} needs store= (the task-vector store to merge)")
        self.tasks = list(tasks) if tasks is not None else self._default_tasks(store, merged, heads)
        self.task_types = resolve_task_types(self.tasks, task_types)
        heads = resolve_heads(self.tasks, heads, heads_dir, self.task_types)
        self._pretrained_arg = pretrained
        self._artifact: Path | None = None
        self._task_models: Mapping[str, Mapping[str, Tensor]] | None = None
        self._loaded_task: int | None = None
        self.packed: PackedTaskVectors | None = None
        self._eval_params: dict[str, Tensor] | None = None
        if method is not None:
            encoder = self._from_method(encoder, store, pretrained, method, method_options or {})
        elif merged is not None:
            encoder = self._from_merged(encoder, merged)
        else:
            encoder = self._from_coefficients(encoder, store, pretrained, coefficients)
        is_per_task = self._artifact is not None or self._task_models is not None
        if per_task is not None and per_task != is_per_task:
            raise TvqError(f"per_task={per_task} but the merge source {'is' if is_per_task else 'is not'} a per-task "
                           "merge (per-task sources: EMR / TALL artifacts or methods)")
        self.model = MultiTaskModel(encoder, heads).requires_grad_(False)
        self._init_eval()

    @staticmethod
    def _default_tasks(store, merged, heads) -> list[str]:
        if store is not None:
            return TaskVectorStore(store).tasks
        if isinstance(merged, (str, Path)) and is_artifact(merged):
            return list(read_artifact(merged)["tasks"])
        if heads is not None:
            return list(heads)
        raise TvqError("pass tasks=[...] (the test dataloaders' order): they cannot be told from a merged file and heads_dir")

    # -- sources --------------------------------------------------------------------------------
    def _from_method(self, encoder, store, pretrained, method, options) -> nn.Module:
        enc, pre_sd = prepare_encoder(encoder, pretrained)
        merger = create_merger(method, **options)
        if merger.per_task:
            tmp = Path(tempfile.mkdtemp(prefix="tvq-eval-"))
            weakref.finalize(self, shutil.rmtree, tmp, True)
            write_per_task(plan_merge(store, pre_sd, merger, tasks=self.tasks), tmp / "artifact")
            return self._from_merged(enc, tmp / "artifact", pre_sd)
        merged = merge_state_dict(store, pre_sd, merger, tasks=self.tasks)
        merged.update(store_bn_statistics(self._bn, bn_stat_keys(enc), pre_sd, store, self.tasks) or {})
        return self._load_into(copy.deepcopy(enc) if enc is encoder else enc, merged)  # never the caller's encoder

    def _from_merged(self, encoder, merged, pre_sd=None) -> nn.Module:
        if isinstance(merged, Mapping) and merged and all(isinstance(v, Mapping) for v in merged.values()):
            missing = [t for t in self.tasks if t not in merged]
            if missing:
                raise TvqError(f"merged: per-task models are given for {', '.join(merged)}, not for task {missing[0]!r}")
            self._task_models = merged     # {task: state dict}: loaded when the task's dataloader starts
            return copy.deepcopy(encoder)
        if isinstance(merged, Mapping):
            return self._from_state_dict(encoder, merged)
        path = Path(merged)
        if is_artifact(path):
            meta = read_artifact(path)
            missing = [t for t in self.tasks if t not in meta["tasks"]]
            if missing:
                raise TvqError(f"merge artifact {path} has no task {missing[0]!r}; it has: {', '.join(meta['tasks'])}")
            self._artifact = path
            enc, self._pre_sd = prepare_encoder(encoder, pre_sd if pre_sd is not None else self._pretrained_arg)
            if self._bn == "recompute":
                raise TvqError("bn_stats='recompute' is not supported for per-task merges (EMR / TALL); use 'mean'")
            self._bn_fixed = store_bn_statistics(self._bn, bn_stat_keys(enc), self._pre_sd, self.hparams.store, self.tasks)
            return copy.deepcopy(enc) if enc is encoder else enc   # task models are loaded into it
        if not path.is_file():
            raise TvqError(f"merged={path}: no such file (a merged .safetensors or a per-task artifact directory)")
        return self._from_state_dict(encoder, load_state_dict(path))

    def _from_state_dict(self, encoder, sd: Mapping[str, Tensor]) -> nn.Module:
        enc = self._load_into(copy.deepcopy(encoder), dict(sd))
        if self._bn in ("pretrained", "mean"):
            _, theta0 = prepare_encoder(encoder, self._pretrained_arg)
            load_bn_statistics(enc, store_bn_statistics(self._bn, bn_stat_keys(enc), theta0, self.hparams.store, self.tasks))
        return enc

    def _from_coefficients(self, encoder, store, pretrained, coefficients) -> nn.Module:
        c = read_coefficients(coefficients)
        if sorted(c.tasks) != sorted(self.tasks):
            raise TvqError(f"{coefficients}: the coefficients are for tasks {c.tasks}, the evaluation is over {self.tasks}")
        enc, pre_sd = prepare_encoder(encoder, pretrained)
        self.packed = PackedTaskVectors(TaskVectorStore(store), pre_sd, c.tasks,
                                        ties=TiesConfig(k=c.ties_k) if c.plus else None)
        c.check(self.packed, coefficients)
        if self._bn != "merged":      # the statistics keys leave the weighted merge (as in AdaMerging)
            enc = copy.deepcopy(enc) if enc is encoder else enc
            apply_bn_policy(enc, self._bn, pre_sd, store, c.tasks, packed=self.packed)
        self.register_buffer("coefficients", c.values.clone(), persistent=False)
        return enc

    @staticmethod
    def _load_into(enc: nn.Module, sd: dict[str, Tensor]) -> nn.Module:
        try:
            enc.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise TvqError(f"the merged weights do not fit the encoder ({first}); merge the encoder's own checkpoint") from None
        return enc

    # -- evaluation -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._check_eval_data()

    def _features(self, images: Tensor, task_index: int) -> Tensor:
        enc = self.model.encoder
        if self._task_models is not None:
            if self._loaded_task != task_index:
                enc.load_state_dict(dict(self._task_models[self.tasks[task_index]]), strict=True)
                self._loaded_task = task_index
            return enc(images)
        if self._artifact is not None:
            if self._loaded_task != task_index:
                _, items = task_model_tensors(self._artifact, self.tasks[task_index], self._pre_sd)
                enc.load_state_dict({k: v for k, v in items}, strict=True)
                if self._bn_fixed:
                    load_bn_statistics(enc, self._bn_fixed)
                self._loaded_task = task_index
            return enc(images)
        if self.packed is not None:
            if self._eval_params is None:
                with torch.no_grad():
                    self._eval_params = merged_params(self.packed, base_tensors(enc), self.coefficients)
            return functional_call(enc, self._eval_params, (images,))
        return enc(images)

    def _epoch_start(self) -> None:
        self._eval_params = None
        self._loaded_task = None
        if self._bn == "recompute":
            enc = self.model.encoder
            if self.packed is not None:
                with torch.no_grad():
                    self._eval_params = merged_params(self.packed, base_tensors(enc), self.coefficients)
            recompute_from_datamodule(enc, self.trainer.datamodule, self.tasks, self.hparams.bn_batches,
                                      self._eval_params)

    def on_test_epoch_start(self) -> None:
        self._epoch_start()

    def on_validation_epoch_start(self) -> None:
        self._epoch_start()

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx, "test")

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx, "val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_predict_epoch_start(self) -> None:
        self._epoch_start()

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict:
        """``{"task": name, "preds": ...}`` of the merged model (one predict loader per task)."""
        return self._predict_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
