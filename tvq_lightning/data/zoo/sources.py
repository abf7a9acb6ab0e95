"""Where each task of the CLIP suites reads its raw ``train`` / ``test`` splits from.

Every task has one or more *layouts* under a root folder, tried in a fixed order:

- ``torchvision``: the folder torchvision's own dataset class reads (``root/MNIST/raw``,
  ``root/cifar-10-batches-py``, ``root/gtsrb``, ...); only these can be fetched (``download=True``);
- ``folder``: class sub-folders, ``root/<dir>/train/<class>/*`` and ``root/<dir>/test/<class>/*``, or
  the task_vectors naming ``root/<dir>/{train,val}`` where ``val`` holds the *test* images (SUN397,
  DTD); with all three of ``train``, ``val`` and ``test``, ``val`` is a validation split given by
  the layout (``EuroSAT_splits``). RESISC45 reads its class folders through the split lists;
- ``hf``: a Hugging Face ``DatasetDict`` written by ``save_to_disk`` at ``root/<task>`` (or at
  ``root/<repo name>``) with an image and a label column and ``train`` and ``test`` splits.

:func:`read_source` picks the first layout present (``format="auto"``) or the one asked for, and
raises one :class:`~tvq_lightning.errors.TvqError` line per task naming the missing folder, the
layouts it accepts and how to get the data. docs/datasets.md lists every task's folders.

This module is the per-task registry; the generic readers it uses are :mod:`.readers` (re-exported here).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from ...errors import TvqError
from .readers import (IMAGE_EXTENSIONS, ArrayImages, FileImages, HFImages, Relabelled, cifar_batches, cifar_classes,
                      labels_of, list_file_images, read_folder_splits, read_hf_splits, read_image_folders, tv_dataset)

__all__ = [
    "EMNIST_SPLIT", "FORMATS", "IMAGE_EXTENSIONS", "ArrayImages", "FileImages", "HFImages", "Layout", "RawSplits",
    "Relabelled", "Source", "cifar_batches", "cifar_classes", "find_source", "folder_splits", "hf_splits",
    "labels_of", "layouts_of", "list_file_images", "list_sources", "order_by_names", "read_folder_splits",
    "read_hf_splits", "read_image_folders", "read_source", "register_source", "relabel_splits", "tv_dataset",
]

FORMATS = ("auto", "torchvision", "folder", "hf")
#: the EMNIST split of the 20-task suite (TALL masks read ``torchvision.datasets.EMNIST(split="digits")``)
EMNIST_SPLIT = "digits"


@dataclass
class RawSplits:
    """A task's splits as read: ``(image, label)`` datasets (images as PIL or arrays, any mode).

    ``test`` is None when the layout has no test split (one is held out of ``train``, see
    :mod:`.splits`); ``val`` is a validation split the layout itself defines, else None (it is
    carved out of ``train``).
    """

    task: str
    kind: str
    where: Path
    train: Dataset
    test: Dataset | None
    val: Dataset | None = None
    classes: list[str] | None = None


@dataclass(frozen=True)
class Layout:
    """One way a task's data can lie under ``root``.

    ``marker``: paths relative to root, any of which says this layout is there (unless one of
    ``unless`` exists too); ``expect``: the layout in words (for messages); ``load(root,
    download)`` reads it; ``downloads``: whether ``load`` can fetch the data when it is missing.
    """

    kind: str
    marker: tuple[str, ...]
    expect: str
    load: Callable[[Path, bool], RawSplits]
    downloads: bool = False
    unless: tuple[str, ...] = ()

    def present(self, root: Path) -> bool:
        """Whether any marker exists under ``root`` (and none of ``unless``)."""
        return any((root / m).exists() for m in self.marker) and not any((root / m).exists() for m in self.unless)


@dataclass(frozen=True)
class Source:
    """A registered task: its own layouts (the class-folder and HF ones are added) and where to get it.

    ``slug``: the folder name of its class-folder and HF layouts (``root/<slug>``); ``hf_repo``
    (and ``hf_config``): the Hugging Face dataset to save there, None where there is none;
    ``relabel[kind](classes)``: a label permutation that brings a layout kind's labels into the
    catalog's class order (None: already in it).
    """

    task: str
    aliases: tuple[str, ...]
    slug: str
    hf_repo: str | None
    hf_config: str | None
    folder_dirs: tuple[str, ...]
    layouts: Callable[[], list[Layout]]
    relabel: dict[str, Callable[[list[str] | None], np.ndarray | None]]


_SOURCES: dict[str, Source] = {}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def register_source(task: str, aliases: Sequence[str] = (), slug: str | None = None, hf_repo: str | None = None,
                    hf_config: str | None = None, folder_dirs: Sequence[str] = (),
                    relabel: dict | None = None) -> Callable:
    """Decorator: ``fn() -> list[Layout]`` describes how ``task``'s raw splits are read.

    ``slug`` (default: the task name in lower case) names ``root/<slug>`` of the class-folder
    and HF layouts; ``folder_dirs`` other class-folder locations tried first; ``hf_repo`` the
    Hugging Face dataset to save there (for messages). See :class:`Source`.
    """
    slug = slug or task.lower()

    def deco(fn: Callable[[], list[Layout]]) -> Callable[[], list[Layout]]:
        _SOURCES[task] = Source(task, tuple(aliases), slug, hf_repo, hf_config, (*folder_dirs, slug), fn,
                                dict(relabel or {}))
        return fn
    return deco


def list_sources() -> list[str]:
    """The registered task names."""
    return list(_SOURCES)


def find_source(name: str, extra_names: Sequence[str] = ()) -> Source:
    """The source of task ``name`` (or of any of ``extra_names``), matched ignoring case and punctuation."""
    wanted = [_norm(n) for n in (name, *extra_names)]
    for want in wanted:
        for src in _SOURCES.values():
            if want == _norm(src.task) or want in {_norm(a) for a in src.aliases}:
                return src
    raise TvqError(f"no data source for task {name!r}; known tasks: {', '.join(_SOURCES)}")


# -- choosing a layout ---------------------------------------------------------------------------
def folder_splits(task: str, base: Path) -> RawSplits:
    """The class-folder layout under ``base`` (see the module docstring for which folder is test)."""
    train, test, val, classes = read_folder_splits(task, base)
    return RawSplits(task, "folder", base, train, test, val, classes)


def hf_splits(task: str, path: Path) -> RawSplits:
    """A ``DatasetDict`` saved with ``save_to_disk`` (``train`` and ``test``, or ``validation``, splits)."""
    train, test, classes = read_hf_splits(task, path)
    return RawSplits(task, "hf", path, train, test, None, classes)


def _generic_layouts(src: Source) -> tuple[list[Layout], list[Layout]]:
    folders = [Layout("folder", (f"{d}/train",), f"{d}/{{train,test}}/<class>/<image>",
                      lambda root, dl, d=d: folder_splits(src.task, root / d), unless=(f"{d}/dataset_dict.json",))
               for d in src.folder_dirs]
    hf_dirs = dict.fromkeys([src.slug] + ([src.hf_repo.rsplit("/", 1)[-1]] if src.hf_repo else []))
    hfs = [Layout("hf", (f"{d}/dataset_dict.json",), f"{d}/ (a saved DatasetDict)",
                  lambda root, dl, d=d: hf_splits(src.task, root / d)) for d in hf_dirs]
    return folders, hfs


def layouts_of(src: Source) -> list[Layout]:
    """A task's layouts in the order ``format="auto"`` tries them: class folders, its own, HF."""
    folders, hfs = _generic_layouts(src)
    return folders + src.layouts() + hfs


def _how_to_get(src: Source, root: Path, layouts: Sequence[Layout]) -> str:
    how = [f"download=True (torchvision fetches it into {root})"] if any(lay.downloads for lay in layouts) else []
    if any(lay.kind == "hf" for lay in layouts):
        if src.hf_repo:
            args = repr(src.hf_repo) + (f", {src.hf_config!r}" if src.hf_config else "")
            how.append(f"datasets.load_dataset({args}).save_to_disk({str(root / src.slug)!r})")
        else:
            how.append(f"a DatasetDict (train, test; image, label) saved to {root / src.slug}")
    return " or ".join(how) or "see docs/datasets.md"


def read_source(task: str, root: str | Path, format: str = "auto", download: bool = False,
                extra_names: Sequence[str] = ()) -> RawSplits:
    """Read ``task``'s raw splits under ``root`` in the layout ``format`` (or the first one present).

    Labels come out in the catalog's class order (see :attr:`Source.relabel`).
    """
    if format not in FORMATS:
        raise TvqError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    src, root = find_source(task, extra_names), Path(root).expanduser()
    layouts = [lay for lay in layouts_of(src) if format in ("auto", lay.kind)]
    if not layouts:
        kinds = ", ".join(sorted({lay.kind for lay in layouts_of(src)}))
        raise TvqError(f"{src.task} has no {format} layout; use format='auto' or one of {kinds} (see docs/datasets.md)")
    found = next((lay for lay in layouts if lay.present(root)), None)
    if found is None and download:
        found = next((lay for lay in layouts if lay.downloads), None)
    if found is None:
        own = src.layouts()
        main = next((lay for lay in layouts if any(lay.marker == o.marker for o in own)), layouts[0])
        others = " or ".join(lay.expect for lay in layouts if lay is not main)
        raise TvqError(f"{src.task}: {root / main.marker[0]} not found (expected {main.expect} under {root}"
                       f"{'; or ' + others if others else ''}); get it with {_how_to_get(src, root, layouts)}")
    raw = found.load(root, download)
    fix = src.relabel.get(raw.kind)
    mapping = fix(raw.classes) if fix is not None else None
    return raw if mapping is None else relabel_splits(raw, mapping)


def relabel_splits(raw: RawSplits, mapping: np.ndarray) -> RawSplits:
    """``raw`` with label ``y`` read as ``mapping[y]`` in every split (and its class list reordered)."""
    mapping = np.asarray(mapping, dtype=np.int64)
    raw.train = Relabelled(raw.train, mapping)
    raw.test = None if raw.test is None else Relabelled(raw.test, mapping)
    raw.val = None if raw.val is None else Relabelled(raw.val, mapping)
    if raw.classes is not None:
        raw.classes = [raw.classes[int(np.flatnonzero(mapping == k)[0])] for k in range(len(mapping))]
    return raw


def order_by_names(classes: Sequence[str], names: Sequence[str]) -> np.ndarray | None:
    """The label mapping that puts ``classes`` (a layout's class names) in the order of ``names``
    (the catalog's), matched ignoring case and punctuation; None unless they match one to one."""
    want = {_norm(n): i for i, n in enumerate(names)}
    have = [_norm(c) for c in classes]
    if len(want) != len(names) or len(have) != len(want) or set(have) != set(want):
        return None
    return np.asarray([want[h] for h in have], dtype=np.int64)


# -- the tasks -----------------------------------------------------------------------------------
def _tv(task: str, cls: str, marker: str | tuple[str, ...], splits=({"train": True}, {"train": False}),
        sub: str | None = None, downloads: bool = True, expect: str | None = None, **fixed) -> Layout:
    """A layout read by ``torchvision.datasets.<cls>`` (root: ``root/<sub>`` or root)."""
    marker = (marker,) if isinstance(marker, str) else marker

    def load(root: Path, download: bool) -> RawSplits:
        where = root / sub if sub else root
        train, test = (tv_dataset(task, cls, root / marker[0], root=str(where), download=download and downloads,
                                  **kw, **fixed) for kw in splits)
        return RawSplits(task, "torchvision", where, train, test, classes=getattr(train, "classes", None))
    return Layout("torchvision", marker, expect or f"{marker[0]} (torchvision.datasets.{cls})", load, downloads)


def _shifted(task: str, cls: str, marker: str, shift: int, **kw) -> Layout:
    """A torchvision layout whose labels start at ``shift`` instead of 0 (EMNIST letters: 1..26)."""
    inner = _tv(task, cls, marker, **kw)

    def load(root: Path, download: bool) -> RawSplits:
        raw = inner.load(root, download)
        n = int(labels_of(raw.train).max()) + 1
        down = np.maximum(np.arange(n) - shift, 0)
        raw.train, raw.test = Relabelled(raw.train, down), Relabelled(raw.test, down)
        raw.classes = None if raw.classes is None else list(raw.classes[shift:])
        return raw
    return Layout(inner.kind, inner.marker, inner.expect, load, inner.downloads)


def _simple(task: str, cls: str, marker: str | tuple[str, ...], aliases=(), slug=None, hf_repo=None, hf_config=None,
            folder_dirs=(), relabel=None, **kw) -> None:
    """Register a task read by one torchvision class (plus the class-folder and HF layouts)."""
    layouts = lambda: [_tv(task, cls, marker, **kw)]   # noqa: E731
    register_source(task, aliases, slug, hf_repo, hf_config, folder_dirs, relabel)(layouts)


_SPLIT = ({"split": "train"}, {"split": "test"})
_simple("MNIST", "MNIST", "MNIST/raw", hf_repo="ylecun/mnist")
_simple("FashionMNIST", "FashionMNIST", "FashionMNIST/raw", ("fashion_mnist",), "fashion_mnist",
        "zalando-datasets/fashion_mnist")
_simple("KMNIST", "KMNIST", "KMNIST/raw", ("kuzushiji_mnist",), hf_repo="tanganke/kmnist")
_simple("EMNIST", "EMNIST", "EMNIST/raw", ("emnist_digits",), hf_repo=None, split=EMNIST_SPLIT)
_simple("SVHN", "SVHN", "svhn/train_32x32.mat", hf_repo="ufldl-stanford/svhn", hf_config="cropped_digits",
        splits=_SPLIT, sub="svhn")
_simple("STL10", "STL10", "stl10_binary", hf_repo="tanganke/stl10", splits=_SPLIT)
_simple("GTSRB", "GTSRB", "gtsrb/GTSRB", hf_repo="tanganke/gtsrb", splits=_SPLIT)
_simple("Food101", "Food101", "food-101/meta", ("food",), hf_repo="ethz/food101", splits=_SPLIT)
_simple("Flowers102", "Flowers102", "flowers-102/setid.mat", ("flowers", "oxford_flowers102"),
        hf_repo="dpdl-benchmark/oxford_flowers102", splits=_SPLIT)
_simple("OxfordIIITPet", "OxfordIIITPet", "oxford-iiit-pet/annotations", ("pets", "oxford_pets"), "oxford_iiit_pet",
        "timm/oxford-iiit-pet", splits=({"split": "trainval"}, {"split": "test"}))
_simple("PCAM", "PCAM", "pcam/camelyonpatch_level_2_split_train_x.h5", ("patchcamelyon",),
        hf_repo="1aurent/PatchCamelyon", splits=_SPLIT)
_simple("RenderedSST2", "RenderedSST2", "rendered-sst2/train", ("sst2",), "rendered_sst2", "nateraw/rendered-sst2",
        splits=_SPLIT)
_simple("Cars", "StanfordCars", "stanford_cars/devkit", ("stanford_cars",), "stanford_cars", "tanganke/stanford_cars",
        folder_dirs=("stanford_cars_folder_based", "cars"), splits=_SPLIT, downloads=False)


@register_source("EMNISTLetters", ("emnist_letters",), "emnist_letters", "tanganke/emnist_letters")
def _emnist_letters() -> list[Layout]:
    return [_shifted("EMNISTLetters", "EMNIST", "EMNIST/raw", 1, split="letters")]


def _cifar(task: str, folder: str, train: Sequence[str], test: Sequence[str], label_key: str, meta: tuple[str, str],
           tv_cls: str) -> Layout:
    def load(root: Path, download: bool) -> RawSplits:
        if download and not (root / folder).is_dir():
            tv_dataset(task, tv_cls, root / folder, root=str(root), download=True)
        where = root / folder
        return RawSplits(task, "torchvision", where, cifar_batches(task, where, train, label_key),
                         cifar_batches(task, where, test, label_key), classes=cifar_classes(where, *meta))
    return Layout("torchvision", (folder,), f"{folder}/ (pickled batches, torchvision.datasets.{tv_cls})", load, True)


register_source("CIFAR10", hf_repo="tanganke/cifar10")(lambda: [_cifar(
    "CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
    ("batches.meta", "label_names"), "CIFAR10")])
register_source("CIFAR100", hf_repo="tanganke/cifar100")(lambda: [_cifar(
    "CIFAR100", "cifar-100-python", ["train"], ["test"], "fine_labels", ("meta", "fine_label_names"), "CIFAR100")])


@register_source("DTD", ("describable_textures",), hf_repo="tanganke/dtd")
def _dtd() -> list[Layout]:
    """torchvision's partition 1: train + val for training (as task_vectors and PAINT), test as test."""
    def load(root: Path, download: bool) -> RawSplits:
        train, val, test = (tv_dataset("DTD", "DTD", root / "dtd/dtd", root=str(root), split=s, download=download)
                            for s in ("train", "val", "test"))
        return RawSplits("DTD", "torchvision", root / "dtd", ConcatDataset([train, val]), test, classes=train.classes)
    return [Layout("torchvision", ("dtd/dtd",), "dtd/dtd/{images,labels} (torchvision.datasets.DTD)", load, True)]


@register_source("EuroSAT", hf_repo="tanganke/eurosat", folder_dirs=("EuroSAT_splits",))
def _eurosat() -> list[Layout]:
    """torchvision's EuroSAT is one folder without splits: the test split is held out (splits.py)."""
    def load(root: Path, download: bool) -> RawSplits:
        ds = tv_dataset("EuroSAT", "EuroSAT", root / "eurosat/2750", root=str(root), download=download)
        return RawSplits("EuroSAT", "torchvision", root / "eurosat", ds, None, classes=ds.classes)
    return [Layout("torchvision", ("eurosat/2750",), "eurosat/2750/<class>/*.jpg (torchvision.datasets.EuroSAT)",
                   load, True)]


@register_source("RESISC45", ("nwpu_resisc45",), hf_repo="tanganke/resisc45")
def _resisc45() -> list[Layout]:
    """Images by class, split by the lists of "In-domain representation learning for remote sensing"."""
    def load(root: Path, download: bool) -> RawSplits:
        base, images = root / "resisc45", root / "resisc45" / "NWPU-RESISC45"
        if not images.is_dir():
            raise TvqError(f"RESISC45: {images} not found; extract NWPU-RESISC45.rar there ({images}/<class>/*.jpg)")
        classes = sorted(p.name for p in images.iterdir() if p.is_dir())
        parts = []
        for split in ("train", "test"):
            lst = base / f"resisc45-{split}.txt"
            if not lst.is_file():
                raise TvqError(f"RESISC45: {lst} not found; put the split lists "
                               f"resisc45-{{train,val,test}}.txt in {base}")
            parts.append(list_file_images("RESISC45", images, classes,
                                          [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]))
        return RawSplits("RESISC45", "folder", base, parts[0], parts[1], classes=classes)
    return [Layout("folder", ("resisc45/resisc45-train.txt",),
                   "resisc45/NWPU-RESISC45/<class>/*.jpg + resisc45/resisc45-{train,val,test}.txt", load)]


def _sun397_swap(classes: list[str] | None) -> np.ndarray | None:
    """The catalog (like task_vectors, TALL masks, FusionBench and their released heads) sorts the
    flattened folder names: 'jail cell' (206) before 'jail indoor' (207). The official ClassName.txt
    (torchvision's layout) has them the other way round: swap them."""
    names = [_norm(c) for c in classes] if classes else None
    if names is None or not (len(names) == 397 and names[206].endswith("jailindoor") and names[207].endswith("jailcell")):
        return None
    mapping = np.arange(397)
    mapping[[206, 207]] = [207, 206]
    return mapping


def _fer_alphabetical(classes: list[str] | None) -> np.ndarray | None:
    """FusionBench's FER2013 copies sort the emotions alphabetically; the catalog keeps the official 0..6."""
    if classes is not None and (len(classes) != 7 or classes != sorted(classes)):
        return None
    return np.asarray([0, 1, 2, 3, 6, 4, 5])   # angry disgust fear happy [neutral] sad surprise


@register_source("SUN397", hf_repo="tanganke/sun397", relabel={"torchvision": _sun397_swap})
def _sun397() -> list[Layout]:
    """The official images with partition 1 (Training_01.txt / Testing_01.txt, 50 + 50 per class)."""
    def load(root: Path, download: bool) -> RawSplits:
        if download and not (root / "SUN397").is_dir():
            tv_dataset("SUN397", "SUN397", root / "SUN397", root=str(root), download=True)
        data = root / "SUN397"
        parts = [next((d / f for d in (data, data / "Partitions") if (d / f).is_file()), data / f)
                 for f in ("ClassName.txt", "Training_01.txt", "Testing_01.txt")]
        missing = [p for p in parts if not p.is_file()]
        if missing:
            raise TvqError(f"SUN397: {missing[0]} not found; put ClassName.txt and the partition files of "
                           f"Partitions.zip (Training_01.txt, Testing_01.txt) in {data}")
        classes = [ln.strip() for ln in parts[0].read_text().splitlines() if ln.strip()]
        index = {c: i for i, c in enumerate(classes)}
        splits = []
        for lst in parts[1:]:
            rel = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
            splits.append(FileImages([data / r.lstrip("/") for r in rel], [index[r.rsplit("/", 1)[0]] for r in rel]))
        return RawSplits("SUN397", "torchvision", data, splits[0], splits[1], classes=classes)
    return [Layout("torchvision", ("SUN397/ClassName.txt",),
                   "SUN397/<letter>/<class>/*.jpg + ClassName.txt, Training_01.txt, Testing_01.txt", load, True)]


_simple("FER2013", "FER2013", ("fer2013/train.csv", "fer2013/fer2013.csv", "fer2013/icml_face_data.csv"), ("fer",),
        hf_repo="clip-benchmark/wds_fer2013", relabel={"hf": _fer_alphabetical}, splits=_SPLIT, downloads=False)
