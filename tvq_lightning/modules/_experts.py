"""Per-sample targets from the fine-tuned experts, computed once: Tinting's pseudo-labels, Surgery's features.

The expert of task t is theta_0 + tau_t, with tau_t dequantized from the store (what the store can
give back of the fine-tuned model). Both Tinting and Surgery train on the unlabelled test images
of every task; their targets are fixed per sample, so they are computed ONCE, without gradients,
before the first step, and looked up by sample index afterwards. For that the training batches
carry indices: the module sets ``datamodule.train_indices = True`` in ``setup`` (and back to False
in ``teardown``; see :class:`~tvq_lightning.data.multitask.IndexedImages`), so each task's batch
is ``(indices, images)``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from ..errors import TvqError
from ..store.reader import TaskVectorStore


def request_indices(trainer, module_name: str) -> None:
    """Ask the datamodule for ``(indices, images)`` training batches (before loaders are built)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "train_indices"):
        raise TvqError(f"{module_name} needs a MultiTaskDataModule (its unlabelled loaders must yield sample indices); "
                       "give data: class_path: tvq_lightning.data.ToyTasks (or another MultiTaskDataModule)")
    if getattr(dm, "train_task", None) is not None:
        raise TvqError(f"{module_name} adapts on every task's unlabelled images: unset data.train_task "
                       f"(it is {dm.train_task!r})")
    dm.train_indices = True


def release_indices(trainer) -> None:
    """Back to plain image batches (``teardown``): the datamodule may serve other modules next."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is not None and hasattr(dm, "train_indices"):
        dm.train_indices = False


def split_batch(batch: Mapping, task: str, module_name: str) -> tuple[Tensor, Tensor]:
    """``(indices, images)`` of ``task`` in a CombinedLoader batch, with a clear error otherwise."""
    item = batch.get(task) if isinstance(batch, Mapping) else None
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor)
            and not item[0].is_floating_point()):
        raise TvqError(f"{module_name}: the training batch of task {task!r} is not (indices, images); fit with a "
                       "MultiTaskDataModule without train_task (the module turns on its train_indices)")
    return item[0], item[1]


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
                   fn: Callable[[Tensor], Tensor], device: torch.device | str, batch_size: int = 128) -> Tensor:
    """``fn(encoder_with(params)(image))`` for every ``(index, image)`` of ``dataset``, row = index."""
    out: Tensor | None = None
    for idx, images in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        y = fn(functional_call(encoder, dict(params), (images.to(device),))).float()
        if out is None:
            out = torch.empty((len(dataset), *y.shape[1:]), device=device)
        out[idx.to(device)] = y
    if out is None:
        raise TvqError("an unlabelled training set is empty; nothing to adapt on")
    return out


def confidence_keep(conf_expert: Tensor, label_expert: Tensor, conf_merged: Tensor, label_merged: Tensor) -> Tensor:
    """Tinting++'s confidence-based sampling: keep a sample if the expert and the merged model agree
    (``y_e == y_m``), or if they disagree and the expert is at least as confident (``c_e >= c_m``).

    All arguments are per-sample tensors (confidences = max softmax probability); returns a bool mask.
    """
    return (label_expert == label_merged) | (conf_expert >= conf_merged)
