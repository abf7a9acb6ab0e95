"""Per-task metrics shared by :class:`~.evaluate.MergedEvaluation` and :class:`~.adamerging.AdaMerging`.

The test (and validation, predict) loaders are one per task, in task order, so ``dataloader_idx``
is the task index. Each task has its task type's metrics (:meth:`~tvq_lightning.tasks.TaskType.metrics`;
classification: a micro ``MulticlassAccuracy`` logged as ``{stage}/acc/{task}``) plus a
``SumMetric`` sample counter; all keep torchmetrics states that are all-reduced on ``compute()``,
so under DDP a metric is over exactly the samples every rank saw — provided no sample is seen twice.
Lightning's default ``DistributedSampler`` pads a dataset whose size is not a multiple of the
world size by repeating samples; the data modules' evaluation loaders use
:class:`~tvq_lightning.data.sampling.UnpaddedDistributedSampler` (rank r gets indices r, r + W, ...),
which Lightning leaves in place; the epoch end warns when the global sample count differs from the
dataset size.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import SumMetric

from ..errors import TvqError
from ..store.checkpoints import load_state_dict
from ..tasks import TaskType, create_task_type

STAGES = ("val", "test")


def resolve_heads(tasks: Sequence[str], heads: Mapping[str, nn.Module] | None = None,
                  heads_dir: str | Path | None = None,
                  task_types: Mapping[str, TaskType] | None = None) -> dict[str, nn.Module]:
    """``{task: head}`` in task order, from a dict or from ``heads_dir/<task>.safetensors`` (read
    by each task's type; classification by default)."""
    tasks = list(tasks)
    if not tasks:
        raise TvqError("no tasks given: pass tasks=[...] (one test dataloader per task, in this order)")
    if len(set(tasks)) != len(tasks):
        raise TvqError(f"tasks {tasks} name a task twice")
    if (heads is None) == (heads_dir is None):
        raise TvqError("pass exactly one of heads (a dict task -> ClassificationHead) and heads_dir (<task>.safetensors files)")
    if heads_dir is not None:
        types = task_types or {}
        out = {}
        for t in tasks:
            path = Path(heads_dir) / f"{t}.safetensors"
            if not path.is_file():
                raise TvqError(f"no head for task {t!r}: {path} does not exist (save heads with ClassificationHead.save)")
            out[t] = (types.get(t) or create_task_type("classification")).load_head(path)
        return out
    missing = [t for t in tasks if t not in heads]
    extra = [t for t in heads if t not in tasks]
    if missing or extra:
        raise TvqError(f"tasks and heads disagree: tasks {tasks}, heads for {list(heads)}"
                       + (f" (no head for {missing[0]!r})" if missing else f" (head {extra[0]!r} is not a task)"))
    return {t: heads[t] for t in tasks}


def prepare_encoder(encoder: nn.Module, pretrained=None) -> tuple[nn.Module, dict[str, Tensor]]:
    """``(encoder, theta_0 state dict)``; with ``pretrained`` (path or state dict), a copy of
    ``encoder`` with those weights loaded (the caller's encoder is never modified)."""
    if pretrained is None:
        return encoder, {k: v.detach() for k, v in encoder.state_dict().items()}
    sd = dict(pretrained) if isinstance(pretrained, Mapping) else load_state_dict(pretrained)
    enc = copy.deepcopy(encoder)
    try:
        enc.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TvqError(f"the pre-trained weights do not fit the encoder ({first}); give the encoder's own checkpoint") from None
    return enc, sd


def split_outputs(out, sizes: Sequence[int]) -> list:
    """``out`` of one encoder pass over concatenated batches, split back into one per batch (a
    tensor, or a list / tuple / dict of them: multi-scale features)."""
    if isinstance(out, Tensor):
        return list(out.split(list(sizes)))
    if isinstance(out, Mapping):
        parts = {k: split_outputs(v, sizes) for k, v in out.items()}
        return [{k: parts[k][i] for k in out} for i in range(len(sizes))]
    if isinstance(out, (list, tuple)):
        parts = [split_outputs(v, sizes) for v in out]
        return [type(out)(p[i] for p in parts) for i in range(len(sizes))]
    raise TvqError(f"cannot split an encoder output of type {type(out).__name__} by task")


class MultiTaskEvalMixin:
    """Per-task metrics for a LightningModule with ``self.model`` (a MultiTaskModel), ``self.tasks``
    and ``self.task_types`` (``{task: TaskType}``).

    Subclasses call :meth:`_init_eval` in ``__init__``, implement ``_features(images, task_index)``,
    and route ``test_step`` / ``validation_step`` to :meth:`_eval_step`, ``predict_step`` to
    :meth:`_predict_step`.
    """

    tasks: list[str]
    task_types: dict[str, TaskType]

    def _init_eval(self) -> None:
        heads = self.model.heads
        self.eval_metrics = nn.ModuleDict({s: nn.ModuleList(
            nn.ModuleDict(self.task_types[t].metrics(heads[t])) for t in self.tasks) for s in STAGES})
        self.eval_counts = nn.ModuleDict({s: nn.ModuleList(SumMetric() for _ in self.tasks) for s in STAGES})
        self._local_counts = {s: [0] * len(self.tasks) for s in STAGES}
        self.results: dict[str, float] = {}       # main metric per task, and "avg"
        self.metric_results: dict[str, dict[str, float]] = {}   # {metric: {task: value, "avg": mean}}
        self.sample_counts: dict[str, int] = {}         # global (all ranks) samples per task
        self.local_sample_counts: dict[str, int] = {}   # this rank's samples per task

    @property
    def metric_names(self) -> list[str]:
        """Every metric name the tasks log (``{stage}/{name}/{task}``), main metrics first."""
        names = [self.task_types[t].main_metric for t in self.tasks]
        names += [i.name for t in self.tasks for i in self.task_types[t].metric_infos]
        return list(dict.fromkeys(names))

    @property
    def percent_metrics(self) -> list[str]:
        """The metric names reports show as percentages."""
        return list(dict.fromkeys(i.name for t in self.tasks for i in self.task_types[t].metric_infos if i.percent))

    def _check_eval_data(self) -> None:
        """Heads must match the datamodule's tasks and output sizes (called from ``setup``)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        dm_tasks = getattr(dm, "tasks", None)
        if dm_tasks is not None and list(dm_tasks) != list(self.tasks):
            raise TvqError(f"the datamodule's tasks {list(dm_tasks)} differ from the module's {self.tasks} "
                           "(test dataloader i must be task i)")
        for t in self.tasks:
            tt = self.task_types[t]
            tt.check_head(t, self.model.heads[t], tt.data_outputs(dm, t), f"the datamodule's task {t!r}")

    def _features(self, images: Tensor, task_index: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _outputs(self, batch, dataloader_idx: int) -> Tensor:
        task = self.tasks[dataloader_idx]
        inputs = self.task_types[task].inputs(batch)
        return self.model.heads[task](self._features(inputs, dataloader_idx))

    def _eval_step(self, batch, dataloader_idx: int, stage: str) -> None:
        tt = self.task_types[self.tasks[dataloader_idx]]
        outputs = self._outputs(batch, dataloader_idx)
        tt.update_metrics(self.eval_metrics[stage][dataloader_idx], outputs, tt.targets(batch))
        n = tt.batch_size(batch)
        self.eval_counts[stage][dataloader_idx].update(torch.tensor(float(n), device=self.device))
        self._local_counts[stage][dataloader_idx] += n

    def _predict_step(self, batch, dataloader_idx: int) -> dict:
        """``{"task": name, "preds": ...}``: the task type's prediction of the (merged) model."""
        task = self.tasks[dataloader_idx]
        return {"task": task, "preds": self.task_types[task].predict(self._outputs(batch, dataloader_idx))}

    def _eval_epoch_end(self, stage: str) -> None:
        per_metric: dict[str, dict[str, float]] = {}
        results, counts, local = {}, {}, {}
        loaders = getattr(self.trainer, f"{stage}_dataloaders", None) if stage == "test" else self.trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        world = self.trainer.world_size if self._trainer is not None else 1
        for i, t in enumerate(self.tasks):
            metrics, cnt = self.eval_metrics[stage][i], self.eval_counts[stage][i]
            if not cnt.update_called and world == 1:   # under DDP every rank must join the reduction
                continue
            local[t] = self._local_counts[stage][i]     # this rank's samples
            for name, metric in metrics.items():
                per_metric.setdefault(name, {})[t] = float(metric.compute())
            results[t] = per_metric[self.task_types[t].main_metric][t]
            counts[t] = int(round(float(cnt.compute())))
            ds = getattr(loaders[i], "dataset", None) if i < len(loaders) and loaders[i] is not None else None
            if ds is not None and hasattr(ds, "__len__") and counts[t] > len(ds):
                rank_zero_warn(f"task {t!r}: {counts[t]} samples were evaluated for a dataset of {len(ds)} "
                               "(a padding DistributedSampler repeats samples; use UnpaddedDistributedSampler)")
            for name, metric in metrics.items():
                self.log(f"{stage}/{name}/{t}", per_metric[name][t], add_dataloader_idx=False)
                metric.reset()
            cnt.reset()
            self._local_counts[stage][i] = 0
        for name, vals in per_metric.items():
            vals["avg"] = sum(vals.values()) / len(vals)
            self.log(f"{stage}/{name}/avg", vals["avg"], add_dataloader_idx=False)
        if results:   # the main metric's average (over the tasks whose main metric the first task's is)
            results["avg"] = per_metric[self.task_types[next(iter(results))].main_metric]["avg"]
        self.metric_results = per_metric
        if stage == "test":
            self.results, self.sample_counts, self.local_sample_counts = results, counts, local
        else:
            self.val_results = results
