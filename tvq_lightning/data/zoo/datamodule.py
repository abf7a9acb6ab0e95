"""One data module for the 8 / 14 / 20-task CLIP suites on the real datasets.

:class:`CLIPSuiteDataModule` is a :class:`~tvq_lightning.data.MultiTaskDataModule`: per task, the
raw splits come from :mod:`.sources` (torchvision folders, class folders or saved HF datasets under
one ``root``), the validation split is carved out of train once and kept in a split file
(:mod:`.splits`), and every image goes through one transform: open_clip's validation
preprocessing of ``model_name`` / ``pretrained``, ``"clip_224"`` (resize 224 bicubic, centre crop,
CLIP mean/std, without open_clip), or any callable, used alike for fine-tuning, adaptation and
evaluation as in the papers. Grey or palette images are converted to RGB first. Samples are
``(image, label)`` with labels in the order of the task catalog (:mod:`.catalog`).

Example (a LightningCLI config takes the same arguments)::

    dm = CLIPSuiteDataModule("8", root="~/data", model_name="ViT-B-32", pretrained="openai")
    loaders = dm.test_dataloader()          # one per task, in suite order
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...errors import TvqError
from ..multitask import MultiTaskDataModule
from .sources import FORMATS, RawSplits, find_source, labels_of, order_by_names, read_source, relabel_splits
from .splits import SplitIndices, load_or_make_split

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORM_NAMES = ("clip_224", "open_clip")
#: the suites when the task catalog cannot be imported (it orders them the same way)
_FALLBACK_SUITES = {"8": ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")}
_FALLBACK_SUITES["14"] = _FALLBACK_SUITES["8"] + ("PCAM", "CIFAR100", "STL10", "OxfordIIITPet", "Flowers102", "FER2013")
_FALLBACK_SUITES["20"] = _FALLBACK_SUITES["14"] + ("CIFAR10", "Food101", "RenderedSST2", "EMNIST", "FashionMNIST",
                                                   "KMNIST")


def _catalog():
    """The task catalog module, or None where it is not installed."""
    try:
        from . import catalog
    except ImportError:
        return None
    return catalog


def clip_224_transform(size: int = 224) -> Callable:
    """Resize (shorter side, bicubic), centre crop, to tensor, CLIP mean/std: CLIP's evaluation transform."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def open_clip_val_transform(model_name: str, pretrained: str | None = None) -> Callable:
    """open_clip's validation preprocessing of ``model_name`` (and ``pretrained`` tag), built from the
    configs alone for built-in models (no weights are loaded); otherwise as the model itself reports."""
    try:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    except ImportError:
        raise TvqError("transform 'open_clip' needs open_clip (pip install tvq_lightning[zoo]); "
                       "or use transform='clip_224'") from None
    cfg = open_clip.get_model_config(model_name.replace("/", "-")) if ":" not in model_name else None
    if cfg is None:
        from ...models.encoders import open_clip_transform

        return open_clip_transform(model_name, pretrained=pretrained)
    pp = asdict(PreprocessCfg())
    if pretrained:
        pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained) or {})
    pp["size"] = cfg.get("vision_cfg", {}).get("image_size", pp["size"])
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def resolve_transform(transform: str | Callable | None, model_name: str | None = None,
                      pretrained: str | None = None) -> Callable:
    """The image transform: a callable as is; ``"clip_224"``; ``"open_clip"`` (of ``model_name``);
    None: open_clip's for ``model_name`` if given, else ``"clip_224"``."""
    if callable(transform):
        return transform
    if transform is None:
        transform = "open_clip" if model_name else "clip_224"
    if transform == "clip_224":
        return clip_224_transform()
    if transform == "open_clip":
        if not model_name:
            raise TvqError("transform='open_clip' needs model_name (e.g. ViT-B-32); or use transform='clip_224'")
        return open_clip_val_transform(model_name, pretrained)
    raise TvqError(f"unknown transform {transform!r}: give a callable or one of {', '.join(TRANSFORM_NAMES)}")


def to_rgb(image: Any) -> Any:
    """A 3-channel image: PIL images of any mode and arrays as RGB PIL, 1-channel tensors repeated."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return to_rgb(Image.fromarray(image))
    if torch.is_tensor(image) and image.ndim == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if torch.is_tensor(image) and image.ndim == 2:
        return image.unsqueeze(0).expand(3, -1, -1)
    return image


class TaskImages(Dataset):
    """``(transform(rgb image), label)`` of ``base`` (restricted to ``indices`` when given)."""

    def __init__(self, base: Dataset, transform: Callable, indices: np.ndarray | None = None):
        self.base, self.transform = base, transform
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[int(i) if self.indices is None else int(self.indices[i])]
        return self.transform(to_rgb(image)), int(label)

    @property
    def labels(self) -> np.ndarray:
        """Every label in order (without reading images where the source keeps them apart)."""
        lab = labels_of(self.base)
        return lab if self.indices is None else lab[self.indices]


def canonical_task(name: str) -> str:
    """The catalog's name of task ``name`` (any alias, any case), else the data source's name."""
    cat = _catalog()
    if cat is not None:
        try:
            return cat.get_task(name).name
        except TvqError:
            pass
    return find_source(name).task


def resolve_tasks(tasks: Sequence[str] | str | int) -> list[str]:
    """Task names from a list, a comma-separated string, or a suite (``"8"``, ``"14"``, ``"20"``)."""
    if isinstance(tasks, (str, int)):
        key = str(tasks).strip()
        if key in _FALLBACK_SUITES:
            cat = _catalog()
            return list(cat.list_tasks(key)) if cat is not None else list(_FALLBACK_SUITES[key])
        tasks = [t.strip() for t in key.split(",") if t.strip()]
    names = [canonical_task(str(t)) for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise TvqError(f"task {dup!r} is listed twice; give each task once")
    return names


class CLIPSuiteDataModule(MultiTaskDataModule):
    """The CLIP model-merging tasks on their real datasets, under one ``root`` folder.

    Args:
        tasks: a suite (``"8"``, ``"14"``, ``"20"``), task names (any catalog alias), or a
            comma-separated string of them.
        root: the folder holding every dataset (docs/datasets.md lists the folders per task).
        transform: a callable on PIL images, ``"clip_224"`` or ``"open_clip"``; None: open_clip's
            validation transform of ``model_name`` when given, else ``"clip_224"``.
        model_name, pretrained: the open_clip model (and pretrained tag) whose transform to use.
        format: ``"auto"`` (the first layout present), ``"torchvision"``, ``"folder"`` or ``"hf"``.
        download: let torchvision fetch missing datasets into ``root`` (only those it can).
        batch_size, eval_batch_size, train_task, num_workers: as :class:`MultiTaskDataModule`.
        val_fraction, max_val: validation split size, ``min(int(n * val_fraction), max_val)`` of train.
        split_dir: where the split files go (default ``$TVQ_CACHE_DIR/zoo/splits``).
    """

    def __init__(self, tasks: Sequence[str] | str | int = "8", root: str = "data",
                 transform: str | Callable | None = None, model_name: str | None = None,
                 pretrained: str | None = None, format: str = "auto", download: bool = False, batch_size: int = 128,
                 eval_batch_size: int | None = None, train_task: str | None = None, num_workers: int = 0,
                 val_fraction: float = 0.1, max_val: int | None = 5000, split_dir: str | None = None):
        names = resolve_tasks(tasks)
        if format not in FORMATS:
            raise TvqError(f"format {format!r} is not one of {', '.join(FORMATS)}")
        train_task = None if train_task is None else canonical_task(train_task)
        super().__init__(names, batch_size, eval_batch_size, train_task, num_workers)
        self.root, self.format, self.download = Path(root).expanduser(), format, download
        self.val_fraction, self.max_val, self.split_dir = val_fraction, max_val, split_dir
        self.model_name, self.pretrained = model_name, pretrained
        self.transform = resolve_transform(transform, model_name, pretrained)
        self._raw: dict[str, RawSplits] = {}
        self._indices: dict[str, SplitIndices | None] = {}

    # -- reading ---------------------------------------------------------------------------------
    def raw(self, task: str) -> RawSplits:
        """``task``'s raw splits as read from ``root`` (once)."""
        if task not in self._raw:
            cat = _catalog()
            extra: tuple[str, ...] = ()
            if cat is not None:
                try:
                    extra = cat.get_task(task).aliases
                except TvqError:
                    pass
            raw = read_source(task, self.root, self.format, self.download, extra)
            names = self.class_names(task)
            by_name = raw.kind != "torchvision" and raw.classes and names
            mapping = order_by_names(raw.classes, names) if by_name else None
            if mapping is not None and not np.array_equal(mapping, np.arange(len(mapping))):
                raw = relabel_splits(raw, mapping)   # class folders / ClassLabel names in another order
            self._raw[task] = raw
        return self._raw[task]

    def class_names(self, task: str) -> list[str] | None:
        """The catalog's class names of ``task`` in label order (None without the catalog)."""
        cat = _catalog()
        if cat is None:
            return None
        try:
            return list(cat.get_task(task).classnames)
        except TvqError:
            return None

    def prepare_data(self) -> None:
        """With ``download``, fetch what torchvision can fetch (Lightning calls this on one process)."""
        if self.download:
            for task in self.tasks:
                self.raw(task)

    def split_indices(self, task: str) -> SplitIndices | None:
        """The task's train / val (/ test) indices into its raw train split; None when the layout has a val split."""
        if task not in self._indices:
            raw = self.raw(task)
            if raw.val is not None and raw.test is not None:
                self._indices[task] = None
            else:
                labels = self._checked_labels(task, raw.train, "train")
                self._indices[task] = load_or_make_split(task, labels, self.split_dir, self.val_fraction, self.max_val,
                                                         hold_out_test=raw.test is None)
        return self._indices[task]

    def _checked_labels(self, task: str, ds: Dataset, split: str) -> np.ndarray:
        try:
            labels = labels_of(ds)
        except TvqError as e:
            raise TvqError(f"{task} ({split} split under {self.raw(task).where}): {e}") from None
        k = self.num_classes(task)
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise TvqError(f"{task}: the {split} split under {self.raw(task).where} has labels "
                           f"{int(labels.min())}..{int(labels.max())}, but the task has {k} classes; "
                           "is it the right dataset (or EMNIST split)?")
        return labels

    # -- MultiTaskDataModule ---------------------------------------------------------------------
    def num_classes(self, task: str) -> int:
        """From the task catalog; without it, from the dataset (its class list, else its labels)."""
        names = self.class_names(task)
        if names:
            return len(names)
        raw = self.raw(task)
        return len(raw.classes) if raw.classes else int(labels_of(raw.train).max()) + 1

    def make_split(self, task: str, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise TvqError(f"unknown split {split!r}: choose train, val or test")
        raw = self.raw(task)
        given = {"test": raw.test, "val": raw.val, "train": raw.train if raw.val is not None else None}[split]
        if given is not None:   # the layout's own split (the official test split; a layout's val and train)
            self._checked_labels(task, given, split)
            return TaskImages(given, self.transform)
        return TaskImages(raw.train, self.transform, getattr(self.split_indices(task), split))
