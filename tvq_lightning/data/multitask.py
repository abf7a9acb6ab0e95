"""A LightningDataModule over several tasks, in the shape every module expects.

- ``train_dataloader()``: with ``train_task`` set, that task's labelled training set (fine-tuning);
  otherwise a :class:`~lightning.pytorch.utilities.CombinedLoader` (``max_size_cycle``) of every
  task's *unlabelled* test images, ``{task: (indices, images)}`` per step (test-time adaptation;
  :class:`IndexedImages`): the sample indices key the per-sample targets Tinting and Surgery cache,
  and AdaMerging ignores them. The module never changes the datamodule: it always yields this.
  The shuffled training loaders are :class:`ResumableLoader`: a fit resumed from a checkpoint
  taken mid-epoch continues with the batches the interrupted fit would have drawn.
- ``val_dataloader()`` / ``test_dataloader()`` / ``predict_dataloader()``: one labelled loader per
  task, in task order, so ``dataloader_idx`` is the task index (predict: the test splits); under
  DDP each task's samples are split across ranks without padding (:mod:`.sampling`), so counts
  and metrics are exact.

Samples are ``(image, target, ...)``: a class label for classification, or e.g. a map and a
validity mask for a dense task type (the task type's batch adapter reads them).

Concrete suites (the generated toy tasks below, the embedded benchmark, public datasets) only
implement :meth:`MultiTaskDataModule.make_split`.
"""
from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import TvqError
from .sampling import unpadded_eval_loader


class ImagesOnly(Dataset):
    """Drop the labels of a labelled dataset (unlabelled adaptation never sees them)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0]


class IndexedImages(Dataset):
    """``(index, image)`` of a labelled dataset: unlabelled adaptation with per-sample caches
    (expert pseudo-targets or features computed once, looked up by index)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return i, self.base[i][0]


class ResumableLoader(DataLoader):
    """A training loader a checkpoint can resume mid-epoch: Lightning's fit loop saves
    :meth:`state_dict` in the checkpoint and hands it back to :meth:`load_state_dict` on resume, so
    the resumed run draws the same batches, in the same order, as a run never interrupted.

    The state is how many batches the current pass over the data gave and the shuffling
    generator's state when the pass began and now. Resuming restores the generator to the pass's
    beginning and replays (loads and drops) the batches it gave; after a finished pass the next
    one begins from the generator's state now. A pass stops after ``len(self)`` batches without
    asking the sampler for more (``RandomSampler``, asked once more, draws a permutation it does
    not use, so the generator's state would depend on whether a finished pass was asked again).
    Under DDP Lightning's ``DistributedSampler`` orders the data by epoch; the replay still skips
    the batches given.
    """

    _resume: dict | None = None
    _pass_start: torch.Tensor | None = None
    _given = 0

    def state_dict(self) -> dict:
        gen = self.generator
        return {"pass_start": self._pass_start, "given": self._given, "now": None if gen is None else gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self):
        state, self._resume = self._resume, None
        gen, skip = self.generator, 0
        if state is not None:
            done = state["given"] >= len(self)   # that pass was over: the next begins where it left the generator
            start = state["now"] if done or state["pass_start"] is None else state["pass_start"]
            if gen is not None and start is not None:
                gen.set_state(start)
            skip = 0 if done else state["given"]
        self._pass_start, self._given = (None if gen is None else gen.get_state()), 0
        return self._batches(super().__iter__(), skip)

    def _batches(self, it, skip: int):
        for _ in range(skip):    # already trained on before the checkpoint
            next(it)
            self._given += 1
        while self._given < len(self):
            try:
                batch = next(it)
            except StopIteration:
                return
            self._given += 1
            yield batch


class MultiTaskDataModule(pl.LightningDataModule):
    """Base class: ``make_split(task, split) -> Dataset`` of ``(image, label)``."""

    def __init__(self, tasks: Sequence[str], batch_size: int = 32, eval_batch_size: int | None = None,
                 train_task: str | None = None, num_workers: int = 0):
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks:
            raise TvqError("a multi-task data module needs at least one task")
        if train_task is not None and train_task not in self.tasks:
            raise TvqError(f"train_task {train_task!r} is not one of the tasks: {', '.join(self.tasks)}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_task = train_task
        self.num_workers = num_workers
        self._splits: dict[tuple[str, str], Dataset] = {}

    # -- to implement --------------------------------------------------------------------------
    def make_split(self, task: str, split: str) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_classes(self, task: str) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def split(self, task: str, split: str) -> Dataset:
        key = (task, split)
        if key not in self._splits:
            self._splits[key] = self.make_split(task, split)
        return self._splits[key]

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        cls = ResumableLoader if shuffle else DataLoader   # the shuffled (training) loaders resume mid-epoch
        return cls(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                   drop_last=False, generator=torch.Generator().manual_seed(0) if shuffle else None)

    def train_dataloader(self):
        if self.train_task is not None:
            return self._loader(self.split(self.train_task, "train"), self.batch_size, shuffle=True)
        return CombinedLoader({t: self._loader(IndexedImages(self.split(t, "test")), self.batch_size, shuffle=True)
                               for t in self.tasks}, mode="max_size_cycle")

    def val_dataloader(self):
        return [unpadded_eval_loader(self._loader(self.split(t, "val"), self.eval_batch_size, shuffle=False))
                for t in self.tasks]

    def test_dataloader(self):
        return [unpadded_eval_loader(self._loader(self.split(t, "test"), self.eval_batch_size, shuffle=False))
                for t in self.tasks]

    def predict_dataloader(self):
        """The test splits, one loader per task (the modules predict with the task's type)."""
        return self.test_dataloader()


class ToyTasks(MultiTaskDataModule):
    """Generated image tasks for tests and tiny configs: each class of each task is a fixed random
    colour pattern plus noise, so a small encoder learns them in seconds. Deterministic per seed.
    """

    def __init__(self, tasks: Sequence[str] = ("a", "b"), num_classes: int | Sequence[int] = 4, image_size: int = 32,
                 train_size: int = 256, val_size: int = 64, test_size: int = 128, noise: float = 0.6, seed: int = 0,
                 batch_size: int = 32, eval_batch_size: int | None = None, train_task: str | None = None,
                 num_workers: int = 0):
        super().__init__(tasks, batch_size, eval_batch_size, train_task, num_workers)
        counts = [num_classes] * len(self.tasks) if isinstance(num_classes, int) else list(num_classes)
        if len(counts) != len(self.tasks):
            raise TvqError(f"num_classes has {len(counts)} entries for {len(self.tasks)} tasks; give one per task")
        self._classes = dict(zip(self.tasks, counts))
        self.image_size, self.noise, self.seed = image_size, noise, seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def num_classes(self, task: str) -> int:
        return self._classes[task]

    def make_split(self, task: str, split: str) -> Dataset:
        t = self.tasks.index(task)
        g = torch.Generator().manual_seed(self.seed * 1000 + t)
        c, s = self._classes[task], self.image_size
        protos = torch.randn(c, 3, s // 8, s // 8, generator=g)
        protos = torch.nn.functional.interpolate(protos, size=(s, s), mode="bilinear", align_corners=False)
        gs = torch.Generator().manual_seed(self.seed * 1000 + t * 10 + ["train", "val", "test"].index(split) + 1)
        n = self.sizes[split]
        labels = torch.randint(0, c, (n,), generator=gs)
        images = protos[labels] + self.noise * torch.randn(n, 3, s, s, generator=gs)
        return TensorDataset(images, labels)


class TensorTasks(MultiTaskDataModule):
    """Tasks given as tensors, ``data[task][split] = (inputs, labels)`` (e.g. features of a frozen
    stem computed once, shared by many runs without recomputing them)."""

    def __init__(self, data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], num_classes: dict[str, int],
                 batch_size: int = 32, eval_batch_size: int | None = None, train_task: str | None = None,
                 num_workers: int = 0):
        super().__init__(list(data), batch_size, eval_batch_size, train_task, num_workers)
        missing = [t for t in self.tasks if t not in num_classes]
        if missing:
            raise TvqError(f"TensorTasks: no class count for task {missing[0]!r}; give num_classes[{missing[0]!r}]")
        self.data, self._classes = data, dict(num_classes)

    def num_classes(self, task: str) -> int:
        return self._classes[task]

    def make_split(self, task: str, split: str) -> Dataset:
        if split not in self.data[task]:
            raise TvqError(f"TensorTasks: task {task!r} has no {split!r} split (it has {', '.join(self.data[task])})")
        return TensorDataset(*self.data[task][split])
