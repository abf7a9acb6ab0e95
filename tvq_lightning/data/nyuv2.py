"""NYUv2 (13-class segmentation, depth, surface normals) from the standard preprocessed ``.npy`` layout.

Layout (the one MTAN and Auto-Lambda distribute and FusionBench reads; 795 training and 654
validation images at 288 x 384)::

    ROOT/train/image/0.npy ... ROOT/train/image/794.npy
    ROOT/train/label/<i>.npy   ROOT/train/depth/<i>.npy   ROOT/train/normal/<i>.npy
    ROOT/val/{image,label,depth,normal}/<i>.npy           (i = 0 .. 653)

Per sample ``i`` (any H x W; the same in every folder):

- ``image``: float ``(H, W, 3)`` RGB in [0, 1] (``(3, H, W)`` and uint8 0..255 are accepted);
- ``label``: ``(H, W)`` class ids 0..12 stored as float or int, ``-1`` = unlabelled (ignored);
- ``depth``: ``(H, W, 1)`` metres (``(1, H, W)`` / ``(H, W)`` accepted), ``0`` = no measurement;
- ``normal``: ``(H, W, 3)`` unit vectors (``(3, H, W)`` accepted), all-zero = no measurement.

Batches are ``(image, target)`` per task: image ``(3, H, W)`` float32; segmentation target
``(H, W)`` int64 with -1 ignored; depth ``(1, H, W)`` float32 (0 invalid); normal ``(3, H, W)``
float32 (zero-length invalid). As in the papers the *test* split is ``val``; a validation split is
carved from ``train`` deterministically (``val_fraction`` of it, by a seeded permutation).

Preparation (docs/dense.md, "Preparing NYUv2"): download the preprocessed NYUv2 of MTAN /
Auto-Lambda (``nyuv2.zip``, several GB of ``.npy`` files) and unzip it so that ``ROOT/train`` and
``ROOT/val`` exist; nothing here downloads. Every missing folder or file, or a file of the wrong
shape or dtype, is one :class:`~tvq_lightning.errors.TvqError` line naming it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import TvqError
from .multitask import MultiTaskDataModule

NYUV2_TASKS = ("segmentation", "depth", "normal")
NYUV2_CLASSES = 13
#: output channels per task (what the heads predict)
NYUV2_OUTPUTS = {"segmentation": NYUV2_CLASSES, "depth": 1, "normal": 3}
_FOLDER = {"segmentation": "label", "depth": "depth", "normal": "normal"}
LAYOUT = "ROOT/{train,val}/{image,label,depth,normal}/<i>.npy (the MTAN / Auto-Lambda preprocessed NYUv2)"


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise TvqError(f"NYUv2: {path} does not exist; every sample needs one file per folder of {LAYOUT}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001  (truncated, not .npy, pickled)
        raise TvqError(f"NYUv2: {path} is not a readable .npy array ({type(e).__name__}); re-extract it from the "
                       "preprocessed NYUv2 archive") from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TvqError(f"NYUv2: {path} holds {getattr(arr, 'dtype', type(arr).__name__)}, not numbers; "
                       "re-extract it from the preprocessed NYUv2 archive")
    return arr


def _channels_first(arr: np.ndarray, channels: int, path: Path, what: str) -> np.ndarray:
    """``(C, H, W)`` from ``(H, W, C)``, ``(C, H, W)`` or (one channel) ``(H, W)``."""
    if arr.ndim == 2 and channels == 1:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] == channels and arr.shape[0] != channels:
        return np.moveaxis(arr, -1, 0)
    if arr.ndim == 3 and arr.shape[0] == channels:
        return arr
    raise TvqError(f"NYUv2: {path} has shape {arr.shape}; a {what} is (H, W, {channels}) or ({channels}, H, W)")


def read_sample(root: Path, index: int, task: str) -> tuple[Tensor, Tensor]:
    """``(image, target)`` of sample ``index`` of the split folder ``root`` (see the module docstring)."""
    img_path = root / "image" / f"{index}.npy"
    img = _channels_first(_load(img_path), 3, img_path, "image")
    image = torch.from_numpy(np.ascontiguousarray(img)).float()
    if img.dtype == np.uint8:
        image = image / 255.0
    path = root / _FOLDER[task] / f"{index}.npy"
    arr = _load(path)
    if task == "segmentation":
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:2])
        if arr.ndim != 2:
            raise TvqError(f"NYUv2: {path} has shape {arr.shape}; a label map is (H, W) of class ids with -1 ignored")
        target = torch.from_numpy(np.rint(arr).astype(np.int64))
        if target.numel() and (int(target.min()) < -1 or int(target.max()) >= NYUV2_CLASSES):
            raise TvqError(f"NYUv2: {path} has label ids {int(target.min())}..{int(target.max())}; the 13-class labels "
                           "are 0..12 with -1 for unlabelled pixels")
    else:
        c = 1 if task == "depth" else 3
        target = torch.from_numpy(np.ascontiguousarray(_channels_first(arr, c, path, f"{task} map"))).float()
    if tuple(target.shape[-2:]) != tuple(image.shape[-2:]):
        raise TvqError(f"NYUv2: {path} is {tuple(target.shape[-2:])} but its image {img_path} is "
                       f"{tuple(image.shape[-2:])}; both must have the same H x W")
    return image, target


class NYUv2Task(Dataset):
    """One task's view of samples ``indices`` of a split folder: items ``(image, target)``."""

    def __init__(self, root: str | Path, task: str, indices: Sequence[int]):
        self.root, self.task, self.indices = Path(root), task, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return read_sample(self.root, self.indices[i], self.task)


def count_samples(split_dir: Path, folders: Sequence[str]) -> int:
    """The number of samples of a split folder; every folder must hold ``0.npy .. (N-1).npy``."""
    if not split_dir.is_dir():
        raise TvqError(f"NYUv2: {split_dir} does not exist; expected {LAYOUT} (see docs/dense.md, Preparing NYUv2)")
    n = None
    for folder in folders:
        d = split_dir / folder
        if not d.is_dir():
            raise TvqError(f"NYUv2: {d} does not exist; expected {LAYOUT} (see docs/dense.md, Preparing NYUv2)")
        ids = sorted(int(p.stem) for p in d.glob("*.npy") if p.stem.isdigit())
        if not ids:
            raise TvqError(f"NYUv2: {d} holds no <i>.npy files; expected {LAYOUT}")
        if ids != list(range(len(ids))):
            missing = next(i for i, j in enumerate(ids) if i != j)
            raise TvqError(f"NYUv2: {d / f'{missing}.npy'} is missing; each folder holds 0.npy .. N-1.npy")
        if n is not None and len(ids) != n:
            raise TvqError(f"NYUv2: {d} holds {len(ids)} samples but {split_dir / folders[0]} holds {n}; "
                           "every folder of a split needs the same files")
        n = len(ids)
    return int(n)


class NYUv2(MultiTaskDataModule):
    """NYUv2 tasks ``segmentation``, ``depth``, ``normal`` from ``root`` (module docstring).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        tasks: a subset of ``("segmentation", "depth", "normal")``, in dataloader order.
        val_fraction: the share of ``train`` held out as the validation split (seeded by ``seed``).
        batch_size, eval_batch_size, train_task, num_workers: as :class:`MultiTaskDataModule`.
    """

    def __init__(self, root: str, tasks: Sequence[str] = NYUV2_TASKS, val_fraction: float = 0.1, seed: int = 0,
                 batch_size: int = 8, eval_batch_size: int | None = None, train_task: str | None = None,
                 num_workers: int = 0):
        unknown = [t for t in tasks if t not in NYUV2_TASKS]
        if unknown:
            raise TvqError(f"NYUv2 has no task {unknown[0]!r}; choose from {', '.join(NYUV2_TASKS)}")
        if not 0.0 <= val_fraction < 1.0:
            raise TvqError(f"val_fraction={val_fraction}: give a share of the training images in [0, 1)")
        super().__init__(tasks, batch_size, eval_batch_size, train_task, num_workers)
        self.root, self.val_fraction, self.seed = Path(root), float(val_fraction), int(seed)
        if not self.root.is_dir():
            raise TvqError(f"NYUv2: {self.root} does not exist; expected {LAYOUT} (see docs/dense.md, Preparing NYUv2)")

    def num_classes(self, task: str) -> int:
        """The output channels of ``task``: 13 classes, 1 depth, 3 normal components."""
        return NYUV2_OUTPUTS[task]

    def _indices(self, task: str, split: str) -> tuple[Path, list[int]]:
        folders = ("image", _FOLDER[task])
        if split == "test":
            d = self.root / "val"
            return d, list(range(count_samples(d, folders)))
        d = self.root / "train"
        n = count_samples(d, folders)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(n * self.val_fraction))
        return d, sorted(perm[:n_val] if split == "val" else perm[n_val:])

    def make_split(self, task: str, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise TvqError(f"NYUv2 has splits train, val and test (= the val folder), not {split!r}")
        d, idx = self._indices(task, split)
        return NYUv2Task(d, task, idx)


def write_standin(root: str | Path, train: int = 6, val: int = 4, size: tuple[int, int] = (32, 48), seed: int = 0) -> Path:
    """Write a tiny random dataset in exactly the preprocessed layout (tests, smoke runs): images
    ``(H, W, 3)`` float32 in [0, 1], labels ``(H, W)`` float32 in -1..12, depth ``(H, W, 1)`` with
    zeros, normals ``(H, W, 3)`` unit vectors with zero vectors where invalid."""
    root, rng = Path(root), np.random.default_rng(seed)
    h, w = size
    for split, n in (("train", train), ("val", val)):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            d = root / split
            np.save(d / "image" / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
            np.save(d / "label" / f"{i}.npy", rng.integers(-1, NYUV2_CLASSES, (h, w)).astype(np.float32))
            depth = rng.uniform(0.5, 10.0, (h, w, 1)).astype(np.float32)
            depth[rng.random((h, w)) < 0.1] = 0.0
            np.save(d / "depth" / f"{i}.npy", depth)
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[rng.random((h, w)) < 0.1] = 0.0
            np.save(d / "normal" / f"{i}.npy", normal)
    return root
