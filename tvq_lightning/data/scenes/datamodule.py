"""``SceneTasks``: the dense scene benchmark as a :class:`~tvq_lightning.data.MultiTaskDataModule`.

Three tasks over the same rendered images (as NYUv2's): ``segmentation`` (target ``(H, W)`` int64,
:data:`~.sampling.CLASSES`, -1 ignored: void above the walls), ``depth`` (``(1, H, W)`` float32,
camera-frame ``z`` in metres, 0 = invalid) and ``normal`` (``(3, H, W)`` float32 camera-frame unit
normals, ``x`` right, ``y`` down, ``z`` forward; zero vectors invalid). Images are normalised
``float32 (3, H, W)`` (:func:`~tvq_lightning.data.embedded.to_tensor`). Unlabelled adaptation
batches are ``{task: (indices, images)}`` as every multi-task data module gives them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ...errors import TvqError
from ..embedded.generate import to_tensor
from ..multitask import MultiTaskDataModule
from .generate import IMAGE_SIZE, SPLIT_SIZES, scene_split
from .sampling import CLASSES

TASKS = ("segmentation", "depth", "normal")
OUT_CHANNELS = {"segmentation": len(CLASSES), "depth": 1, "normal": 3}


def task_target(task: str, split: dict[str, np.ndarray]) -> torch.Tensor:
    """One task's targets from a split of :func:`.generate.scene_split`."""
    if task == "segmentation":
        return torch.from_numpy(split["label"])
    if task == "depth":
        return torch.from_numpy(split["depth"])[:, None]
    return torch.from_numpy(np.ascontiguousarray(split["normal"].transpose(0, 3, 1, 2)))


class SceneTasks(MultiTaskDataModule):
    """Rendered indoor scenes with segmentation, depth and surface-normal targets.

    Args:
        tasks: a subset of :data:`TASKS` (default: all three).
        seed: the generator's seed.
        image_size: square resolution (default 64).
        train_size, val_size, test_size: images per split (defaults 2000 / 200 / 200), shared by the tasks.

    ``num_classes(task)`` is the task's output channels (7 classes, 1, 3).
    """

    def __init__(self, tasks: Sequence[str] = TASKS, seed: int = 0, image_size: int = IMAGE_SIZE,
                 train_size: int = SPLIT_SIZES["train"], val_size: int = SPLIT_SIZES["val"],
                 test_size: int = SPLIT_SIZES["test"], batch_size: int = 32, eval_batch_size: int | None = 128,
                 train_task: str | None = None, num_workers: int = 0):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise TvqError(f"unknown scene task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        super().__init__(tasks, batch_size, eval_batch_size, train_task, num_workers)
        self.seed, self.image_size = seed, image_size
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self._images: dict[str, tuple[dict, torch.Tensor]] = {}

    def num_classes(self, task: str) -> int:
        return OUT_CHANNELS[task]

    def _data(self, split: str) -> tuple[dict, torch.Tensor]:
        if split not in self._images:   # one render and one image tensor per split, shared by the tasks
            z = scene_split(split, self.seed, self.sizes[split], self.image_size)
            self._images[split] = (z, to_tensor(z["image"]))
        return self._images[split]

    def make_split(self, task: str, split: str) -> Dataset:
        z, images = self._data(split)
        return TensorDataset(images, task_target(task, z))
