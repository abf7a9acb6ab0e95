"""Per-sample targets from the fine-tuned experts, computed once: Tinting's pseudo-targets, Surgery's features.

The expert of task t is theta_0 + tau_t, with tau_t dequantized from the store (what the store can
give back of the fine-tuned model). Both Tinting and Surgery train on the unlabelled test images
of every task; their targets are fixed per sample (labels, or maps for dense task types), so they
are computed ONCE, without gradients, before the first step, and looked up by sample index
afterwards. For that the training batches carry indices: a
:class:`~tvq_lightning.data.MultiTaskDataModule` without ``train_task`` always yields
``{task: (indices, images)}`` (:class:`~tvq_lightning.data.multitask.IndexedImages`); the
modules only read the datamodule, never change it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from ..errors import TvqError
from ..store.reader import TaskVectorStore
from ..tasks import TaskType


def check_unlabelled_data(trainer, module_name: str) -> None:
    """The datamodule must give every task's unlabelled ``(indices, images)`` batches (read only)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "tasks"):
        raise TvqError(f"{module_name} needs a MultiTaskDataModule (its unlabelled loaders must yield sample indices); "
                       "give data: class_path: tvq_lightning.data.ToyTasks (or another MultiTaskDataModule)")
    if getattr(dm, "train_task", None) is not None:
        raise TvqError(f"{module_name} adapts on every task's unlabelled images: unset data.train_task "
                       f"(it is {dm.train_task!r})")


def split_batch(batch: Mapping, task: str, module_name: str, task_type: TaskType) -> tuple[Tensor, Tensor]:
    """``(indices, images)`` of ``task`` in a CombinedLoader batch, with a clear error otherwise."""
    item = batch.get(task) if isinstance(batch, Mapping) else None
    try:
        idx, images = task_type.unlabelled(item)
    except TvqError:
        idx = None
    if idx is None:
        raise TvqError(f"{module_name}: the training batch of task {task!r} is not (indices, images); fit with a "
                       "MultiTaskDataModule without train_task (its unlabelled batches carry sample indices)")
    return idx, images


def indexed_datasets(trainer, tasks: Sequence[str]) -> dict[str, Dataset]:
    """The ``(index, image)`` dataset behind each task's training loader (valid from ``on_train_start``)."""
    loader = trainer.train_dataloader
    iterables = loader.iterables if isinstance(loader, CombinedLoader) else loader
    if not isinstance(iterables, Mapping) or any(t not in iterables for t in tasks):
        raise TvqError(f"the training loader must be a CombinedLoader {{task: loader}} over tasks {list(tasks)}")
    return {t: iterables[t].dataset for t in tasks}


def expert_params(store: TaskVectorStore, pretrained: Mapping[str, Tensor], task: str,
                  device: torch.device | str) -> dict[str, Tensor]:
    """theta_0 + tau_task for every store key, on ``device`` (tau dequantized from the store)."""
    out = {}
    for key in store.keys:
        if key not in pretrained:
            raise TvqError(f"the encoder has no parameter or buffer {key!r} (a key of store {store.path})")
        pre = pretrained[key].detach()
        tau = store.task_vector(task, key, pre.cpu())
        out[key] = (pre.float().to(device) + tau.to(device)).to(pre.dtype)
    return out


@torch.no_grad()
def expert_outputs(encoder: nn.Module, params: Mapping[str, Tensor], dataset: Dataset,
                   fn: Callable[[Any], Tensor | tuple[Tensor, ...]], device: torch.device | str,
                   batch_size: int = 128) -> Tensor | tuple[Tensor, ...]:
    """``fn(encoder_with(params)(image))`` for every ``(index, image)`` of ``dataset``, row = index.

    ``fn`` returns a tensor or a tuple of tensors (e.g. a pseudo-target and its confidence); each is
    gathered into one ``(len(dataset), ...)`` tensor (floating ones as float32, integer ones as they are).
    """
    outs: list[Tensor] | None = None
    single = False
    for idx, images in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        y = fn(functional_call(encoder, dict(params), (images.to(device),)))
        single = isinstance(y, Tensor)
        ys = [y] if single else list(y)
        ys = [v.float() if v.is_floating_point() else v for v in ys]
        if outs is None:
            outs = [torch.empty((len(dataset), *v.shape[1:]), dtype=v.dtype, device=device) for v in ys]
        for o, v in zip(outs, ys):
            o[idx.to(device)] = v
    if outs is None:
        raise TvqError("an unlabelled training set is empty; nothing to adapt on")
    return outs[0] if single else tuple(outs)
