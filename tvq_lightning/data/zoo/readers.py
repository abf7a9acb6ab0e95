"""Generic readers of image-classification data, shared by every task of :mod:`.sources`.

- datasets of ``(image, label)`` pairs: :class:`FileImages` (image files), :class:`ArrayImages`
  (a uint8 array), :class:`HFImages` (a Hugging Face ``Dataset``) and :class:`Relabelled` (labels
  mapped through a permutation); :func:`labels_of` reads every label of such a dataset (or of a
  torchvision one) without decoding images;
- readers of the layouts: class folders (:func:`read_image_folders`, :func:`read_folder_splits`),
  split lists (:func:`list_file_images`), a saved ``DatasetDict`` (:func:`read_hf_splits`), the
  pickled CIFAR batches (:func:`cifar_batches`, :func:`cifar_classes`) and torchvision's dataset
  classes (:func:`tv_dataset`).

Their failures are one :class:`~tvq_lightning.errors.TvqError` line each. Which task reads what,
and in which order, is :mod:`.sources`.
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from ...errors import TvqError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
_HF_IMAGE_COLUMNS = ("image", "img", "jpg", "png")
_HF_LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "target")


def _pil_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class FileImages(Dataset):
    """``(image, label)`` from a list of image files and their labels."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int]):
        self.files, self.targets = list(files), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return _pil_rgb(self.files[i]), int(self.targets[i])


class ArrayImages(Dataset):
    """``(image, label)`` from a uint8 array of ``(N, H, W, C)`` or ``(N, H, W)`` images."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        self.images, self.targets = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i]), int(self.targets[i])


class HFImages(Dataset):
    """``(image, label)`` rows of a Hugging Face ``Dataset`` (its labels read once, from Arrow)."""

    def __init__(self, ds, image_col: str, label_col: str):
        self.ds, self.image_col = ds, image_col
        self.targets = np.asarray(ds.data.column(label_col).to_numpy(zero_copy_only=False)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.ds[int(i)][self.image_col], int(self.targets[i])


def labels_of(ds: Dataset) -> np.ndarray:
    """Every label of ``ds`` in order, without decoding images where the dataset keeps them apart."""
    if isinstance(ds, ConcatDataset):
        return np.concatenate([labels_of(d) for d in ds.datasets]) if ds.datasets else np.zeros(0, np.int64)
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if type(ds).__name__ == "PCAM":   # labels live in an HDF5 file beside the images
        split = ds._split
        with ds.h5py.File(ds._base_folder / ds._FILES[split]["targets"][0]) as f:
            return np.asarray(f["y"]).reshape(-1).astype(np.int64)
    for attr in ("targets", "labels", "_labels"):
        lab = getattr(ds, attr, None)
        if lab is not None and not callable(lab):
            arr = np.asarray(lab.numpy() if hasattr(lab, "numpy") else lab)
            return arr.astype(np.int64) if arr.dtype.kind in "iub" else np.asarray([int(x) for x in lab], np.int64)
    samples = getattr(ds, "_samples", None)
    if samples is not None:
        if any(s[1] is None for s in samples):
            raise TvqError(f"{type(ds).__name__} has samples without labels; use a copy of the data with labels")
        return np.asarray([int(s[1]) for s in samples], dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def read_image_folders(split_dir: Path, classes: Sequence[str]) -> FileImages:
    """Images under ``split_dir/<class>/`` labelled by the index of their class in ``classes``."""
    known = set(classes)
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in known)
    if unknown:
        raise TvqError(f"{split_dir} has class folder {unknown[0]!r} that the train folder lacks; "
                       "every split needs the same class folders")
    files, labels = [], []
    for i, c in enumerate(classes):
        d = split_dir / c
        if d.is_dir():
            found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            labels += [i] * len(found)
    return FileImages(files, labels)


def read_folder_splits(task: str, base: Path) -> tuple[FileImages, FileImages, FileImages | None, list[str]]:
    """``(train, test, val, classes)`` of the class folders under ``base``: ``base/test`` is the test split
    when present (then ``base/val``, if any, is a validation split), else ``base/val`` is (see :mod:`.sources`)."""
    train_dir = base / "train"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise TvqError(f"{task}: {train_dir} has no class folders; expected {train_dir}/<class>/<image>")
    has_test = (base / "test").is_dir()
    test_dir = base / ("test" if has_test else "val")
    if not test_dir.is_dir():
        raise TvqError(f"{task}: {base} has train/ but neither test/ nor val/; "
                       f"put the test images in {base}/test/<class>/")
    val = read_image_folders(base / "val", classes) if has_test and (base / "val").is_dir() else None
    return read_image_folders(train_dir, classes), read_image_folders(test_dir, classes), val, classes


def read_hf_splits(task: str, path: Path) -> tuple[HFImages, HFImages, list[str] | None]:
    """``(train, test, classes)`` of a ``DatasetDict`` saved with ``save_to_disk`` (``train`` and ``test``,
    or ``validation``, splits; class names from the label feature, None without them)."""
    try:
        import datasets
    except ImportError:
        raise TvqError(f"{task}: reading {path} needs the `datasets` package (pip install datasets)") from None
    dd = datasets.load_from_disk(str(path))
    if not isinstance(dd, datasets.DatasetDict):
        raise TvqError(f"{task}: {path} holds one split; save the DatasetDict (with train and test) instead")
    test_name = next((s for s in ("test", "validation", "valid") if s in dd), None)
    if "train" not in dd or test_name is None:
        raise TvqError(f"{task}: {path} has splits {', '.join(dd)}; it needs train and test")
    cols = dd["train"].column_names
    image_col = next((c for c in _HF_IMAGE_COLUMNS if c in cols), None)
    label_col = next((c for c in _HF_LABEL_COLUMNS if c in cols), None)
    if image_col is None or label_col is None:
        raise TvqError(f"{task}: {path} has columns {', '.join(cols)}; it needs an image column "
                       f"({'/'.join(_HF_IMAGE_COLUMNS)}) and a label column ({'/'.join(_HF_LABEL_COLUMNS)})")
    feature = dd["train"].features[label_col]
    classes = list(feature.names) if hasattr(feature, "names") else None
    return HFImages(dd["train"], image_col, label_col), HFImages(dd[test_name], image_col, label_col), classes


def tv_dataset(task: str, cls_name: str, where: Path, **kwargs) -> Dataset:
    """``torchvision.datasets.<cls_name>(**kwargs)``, its failures as one TvqError line."""
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(**kwargs)
    except ImportError as e:
        raise TvqError(f"{task}: torchvision's {cls_name} needs the {e.name or 'missing'} package "
                       f"(pip install {e.name or '...'}), or use format='hf'") from None
    except (RuntimeError, FileNotFoundError, ValueError, OSError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise TvqError(f"{task}: torchvision's {cls_name} cannot read {where} ({msg}); re-extract it there, "
                       "or use download=True where torchvision can fetch it") from None


def list_file_images(task: str, image_root: Path, classes: Sequence[str], names: Sequence[str]) -> FileImages:
    """Images of ``image_root/<class>/<name>`` for the listed file names (class from the folder)."""
    where = {}
    for i, c in enumerate(classes):
        for p in (image_root / c).iterdir():
            where[p.name] = (p, i)
    missing = [n for n in names if n not in where]
    if missing:
        raise TvqError(f"{task}: {missing[0]} is listed in the split file but not under {image_root}/<class>/; "
                       "re-extract the images")
    return FileImages([where[n][0] for n in names], [where[n][1] for n in names])


def cifar_batches(task: str, folder: Path, files: Sequence[str], label_key: str) -> ArrayImages:
    """The pickled CIFAR batches ``files`` of ``folder``: dicts of ``data`` (N x 3072) and labels."""
    data, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise TvqError(f"{task}: {path} is missing; the CIFAR layout needs {', '.join(files)} in {folder}")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")   # the CIFAR distribution format (trusted local files)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(entry[label_key])
    return ArrayImages(np.concatenate(data), labels)


def cifar_classes(folder: Path, meta: str, key: str) -> list[str] | None:
    """Class names from a CIFAR meta file (None when it is absent)."""
    if not (folder / meta).is_file():
        return None
    with open(folder / meta, "rb") as f:
        return list(pickle.load(f, encoding="latin1")[key])


class Relabelled(Dataset):
    """``base`` with every label ``y`` replaced by ``mapping[y]``."""

    def __init__(self, base: Dataset, mapping: np.ndarray):
        self.base, self.mapping = base, np.asarray(mapping, dtype=np.int64)
        self.targets = self.mapping[labels_of(base)]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, int(self.mapping[int(label)])
