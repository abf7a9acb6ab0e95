"""Lightning data modules over the embedded benchmark.

- :class:`EmbeddedTasks`: the eight classification tasks (any subset) as a
  :class:`~tvq_lightning.data.MultiTaskDataModule`. With ``precompute`` (a frozen module, e.g. the
  tiny CLIP's convolutional stem) each split's images are passed through it once and the
  outputs stand in for the images: the protocol of fine-tuning only the top of an encoder.
- :class:`CaptionPairs`: generated image-caption pairs for contrastive pre-training; batches are
  ``(images uint8, tokens, caption_ids)`` (equal captions share an id, so the loss can mask them
  as negatives); ``predict_dataloader`` serves the same pairs in order, every one of them.

Like every :class:`~tvq_lightning.data.MultiTaskDataModule`, :class:`EmbeddedTasks` always gives
unlabelled adaptation batches as ``{task: (indices, inputs)}``; no module changes its settings.
"""
from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ...errors import TvqError
from ..multitask import MultiTaskDataModule
from .generate import SPLIT_SIZES, caption_pairs, task_split, to_tensor
from .tasks import TASK_NAMES, TASKS


@torch.no_grad()
def apply_frozen(module: nn.Module, images: np.ndarray, batch_size: int = 512) -> Tensor:
    """``module(to_tensor(images))`` in batches, without gradients, on the module's device, to CPU."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    outs = [module(to_tensor(images[i:i + batch_size]).to(device)).cpu() for i in range(0, len(images), batch_size)]
    module.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


class EmbeddedTasks(MultiTaskDataModule):
    """The embedded benchmark's tasks (:data:`~.tasks.TASK_NAMES`), deterministic per ``seed``.

    Args:
        tasks: a subset of the task names (default: all eight).
        seed: the generator's seed.
        train_size, val_size, test_size: per-task split sizes (defaults 3000 / 200 / 400).
        precompute: a frozen module applied once to every split's images (see the module docstring).
    """

    def __init__(self, tasks: Sequence[str] = TASK_NAMES, seed: int = 0, train_size: int = SPLIT_SIZES["train"],
                 val_size: int = SPLIT_SIZES["val"], test_size: int = SPLIT_SIZES["test"], batch_size: int = 64,
                 eval_batch_size: int | None = 256, train_task: str | None = None, num_workers: int = 0,
                 precompute: nn.Module | None = None):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise TvqError(f"unknown embedded task {unknown[0]!r}; choose from {', '.join(TASK_NAMES)}")
        super().__init__(tasks, batch_size, eval_batch_size, train_task, num_workers)
        self.seed = seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.precompute = precompute

    def num_classes(self, task: str) -> int:
        return TASKS[task].num_classes

    def make_split(self, task: str, split: str) -> Dataset:
        images, labels = task_split(task, split, self.seed, self.sizes[split])
        x = apply_frozen(self.precompute, images) if self.precompute is not None else to_tensor(images)
        return TensorDataset(x, torch.from_numpy(labels))


class CaptionPairs(pl.LightningDataModule):
    """Generated image-caption pairs (the broad pre-training mixture of :mod:`.scenes`).

    Args:
        num_samples: pairs generated (and cached) once; epochs cycle over them.
        seed: the generator's seed (different from the tasks' data by construction).
        batch_size: contrastive batch size.
        context_length: text tokens per caption (the tokenizer's).
    """

    def __init__(self, num_samples: int = 60000, seed: int = 0, batch_size: int = 256, context_length: int = 20,
                 num_workers: int = 0):
        super().__init__()
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.context_length, self.num_workers = context_length, num_workers
        self._train: Dataset | None = None

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        from ...models.tiny_clip import WordTokenizer
        from .vocab import vocabulary

        images, captions = caption_pairs(self.num_samples, self.seed)
        tokens = WordTokenizer(vocabulary(), self.context_length)(captions)
        _, ids = np.unique(np.asarray(captions), return_inverse=True)
        self._train = TensorDataset(torch.from_numpy(images), tokens, torch.from_numpy(ids.astype(np.int64)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
