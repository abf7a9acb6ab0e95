"""Per-task accuracy shared by :class:`~.evaluate.MergedEvaluation` and :class:`~.adamerging.AdaMerging`.

The test (and validation) loaders are one per task, in task order, so ``dataloader_idx`` is the
task index. Each task has its own ``MulticlassAccuracy(average="micro")`` plus a ``SumMetric``
sample counter; both keep torchmetrics states that are all-reduced on ``compute()``, so under DDP
the accuracy is over exactly the samples every rank saw — provided no sample is seen twice.
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
from torchmetrics.classification import MulticlassAccuracy

from ..errors import TvqError
from ..models.heads import ClassificationHead
from ..store.checkpoints import load_state_dict

STAGES = ("val", "test")


def resolve_heads(tasks: Sequence[str], heads: Mapping[str, nn.Module] | None = None,
                  heads_dir: str | Path | None = None) -> dict[str, nn.Module]:
    """``{task: head}`` in task order, from a dict or from ``heads_dir/<task>.safetensors``."""
    tasks = list(tasks)
    if not tasks:
        raise TvqError("no tasks given: pass tasks=[...] (one test dataloader per task, in this order)")
    if len(set(tasks)) != len(tasks):
        raise TvqError(f"tasks {tasks} name a task twice")
    if (heads is None) == (heads_dir is None):
        raise TvqError("pass exactly one of heads (a dict task -> ClassificationHead) and heads_dir (<task>.safetensors files)")
    if heads_dir is not None:
        out = {}
        for t in tasks:
            path = Path(heads_dir) / f"{t}.safetensors"
            if not path.is_file():
                raise TvqError(f"no head for task {t!r}: {path} does not exist (save heads with ClassificationHead.save)")
            out[t] = ClassificationHead.load(path)
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


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` (AdaMerging's loss)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


class MultiTaskEvalMixin:
    """Per-task accuracy for a LightningModule with ``self.model`` (a MultiTaskModel) and ``self.tasks``.

    Subclasses call :meth:`_init_eval` in ``__init__``, implement ``_features(images, task_index)``,
    and route ``test_step`` / ``validation_step`` to :meth:`_eval_step`.
    """

    tasks: list[str]

    def _init_eval(self) -> None:
        heads = self.model.heads
        self.eval_metrics = nn.ModuleDict({s: nn.ModuleList(
            MulticlassAccuracy(num_classes=heads[t].num_classes, average="micro") for t in self.tasks) for s in STAGES})
        self.eval_counts = nn.ModuleDict({s: nn.ModuleList(SumMetric() for _ in self.tasks) for s in STAGES})
        self.results: dict[str, float] = {}
        self.sample_counts: dict[str, int] = {}         # global (all ranks) samples per task
        self.local_sample_counts: dict[str, int] = {}   # this rank's samples per task

    def _check_eval_data(self) -> None:
        """Heads must match the datamodule's tasks and class counts (called from ``setup``)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        dm_tasks = getattr(dm, "tasks", None)
        if dm_tasks is not None and list(dm_tasks) != list(self.tasks):
            raise TvqError(f"the datamodule's tasks {list(dm_tasks)} differ from the module's {self.tasks} "
                           "(test dataloader i must be task i)")
        if hasattr(dm, "num_classes"):
            for t in self.tasks:
                n, h = dm.num_classes(t), self.model.heads[t].num_classes
                if n != h:
                    raise TvqError(f"task {t!r}: the head has {h} classes but the datamodule's task has {n}; "
                                   "give the head built for this dataset")

    def _features(self, images: Tensor, task_index: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eval_step(self, batch, dataloader_idx: int, stage: str) -> None:
        images, labels = batch
        task = self.tasks[dataloader_idx]
        logits = self.model.heads[task](self._features(images, dataloader_idx))
        self.eval_metrics[stage][dataloader_idx].update(logits, labels)
        self.eval_counts[stage][dataloader_idx].update(torch.tensor(float(labels.shape[0]), device=logits.device))

    def _eval_epoch_end(self, stage: str) -> None:
        results, counts, local = {}, {}, {}
        loaders = getattr(self.trainer, f"{stage}_dataloaders", None) if stage == "test" else self.trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        world = self.trainer.world_size if self._trainer is not None else 1
        for i, t in enumerate(self.tasks):
            acc, cnt = self.eval_metrics[stage][i], self.eval_counts[stage][i]
            if not acc.update_called and world == 1:   # under DDP every rank must join the reduction
                continue
            local[t] = int(acc.tp.sum() + acc.fn.sum())     # this rank's samples (micro states)
            results[t] = float(acc.compute())
            counts[t] = int(round(float(cnt.compute())))
            ds = getattr(loaders[i], "dataset", None) if i < len(loaders) and loaders[i] is not None else None
            if ds is not None and hasattr(ds, "__len__") and counts[t] > len(ds):
                rank_zero_warn(f"task {t!r}: {counts[t]} samples were evaluated for a dataset of {len(ds)} "
                               "(a padding DistributedSampler repeats samples; use UnpaddedDistributedSampler)")
            self.log(f"{stage}/acc/{t}", results[t], add_dataloader_idx=False)
            acc.reset()
            cnt.reset()
        if results:
            avg = sum(results.values()) / len(results)
            self.log(f"{stage}/acc/avg", avg, add_dataloader_idx=False)
            results["avg"] = avg
        if stage == "test":
            self.results, self.sample_counts, self.local_sample_counts = results, counts, local
        else:
            self.val_results = results
