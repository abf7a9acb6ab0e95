"""The validation split of each task, computed once and kept in a split file.

The convention of task_vectors (``split_train_into_train_val``, kept by TALL masks and the
papers after them): the validation split is a random part of the *training* set, ``val =
min(int(n * val_fraction), max_val)`` samples (0.1 and 5,000), drawn by
``torch.utils.data.random_split(train, [n - val, val], generator=torch.Generator().manual_seed(0))``;
the test split is the official one. :func:`partition` draws exactly those index lists (the first
``n - val`` entries of ``torch.randperm(n)`` are the training part, the rest validation), so on
the same training set the indices are the ones task_vectors uses.

A layout without a test split (torchvision's EuroSAT, one folder of 27,000 images) has one held
out first: ``test = int(n * 0.1)`` samples at the end of the permutation, the validation split
before them (sized on ``n`` as well: 21,600 / 2,700 / 2,700, the sizes of the papers' EuroSAT).

Split files: ``<split_dir>/<task>_split.json`` holds the indices with the number of samples
and a SHA-256 of the training labels in order. A later run reuses the file; one whose dataset
has changed (other size or labels) or that asks other settings is refused with a TvqError
naming the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import TvqError
from ...runtime import cache_root
from ...store.io import atomic_write_json

SPLIT_VERSION = 1
#: the seed of task_vectors' ``split_train_into_train_val``
SPLIT_SEED = 0
#: share held out as test where a layout has no test split (EuroSAT: 2,700 of 27,000, as in the papers)
HOLDOUT_TEST_FRACTION = 0.1


@dataclass(frozen=True)
class SplitIndices:
    """Indices into a task's raw training set: train, val and (when it had none) test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None = None


def default_split_dir() -> Path:
    """``$TVQ_CACHE_DIR`` (default ``~/.cache/tvq_lightning``) ``/zoo/splits``."""
    return cache_root() / "zoo" / "splits"


def val_count(n: int, val_fraction: float, max_val: int | None) -> int:
    """``min(int(n * val_fraction), max_val)``: the validation split's size for ``n`` training samples."""
    v = int(n * val_fraction)
    return v if max_val is None else min(v, int(max_val))


def partition(n: int, val_fraction: float = 0.1, max_val: int | None = 5000, seed: int = SPLIT_SEED,
              hold_out_test: bool = False) -> SplitIndices:
    """The split of ``n`` training samples (see the module docstring), checked to leave every part non-empty."""
    if not 0.0 < val_fraction < 1.0:
        raise TvqError(f"val_fraction must lie strictly between 0 and 1, not {val_fraction}")
    if max_val is not None and max_val < 1:
        raise TvqError(f"max_val must be at least 1 (or None for no cap), not {max_val}")
    v = val_count(n, val_fraction, max_val)
    t = int(n * HOLDOUT_TEST_FRACTION) if hold_out_test else 0
    if v < 1 or n - v - t < 1 or (hold_out_test and t < 1):
        raise TvqError(f"a training set of {n} samples is too small for a validation split of val_fraction="
                       f"{val_fraction}; give a larger dataset or val_fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.int64)
    train, val, test = perm[:n - v - t], perm[n - v - t:n - t], perm[n - t:]
    return SplitIndices(train, val, test if hold_out_test else None)


def labels_digest(labels: np.ndarray) -> str:
    """SHA-256 of the labels in order (with their count): what a split file is checked against."""
    arr = np.ascontiguousarray(np.asarray(labels, dtype="<i8"))
    h = hashlib.sha256(len(arr).to_bytes(8, "little"))
    h.update(arr.tobytes())
    return h.hexdigest()


def split_file(split_dir: str | Path, task: str) -> Path:
    return Path(split_dir).expanduser() / f"{task}_split.json"


def _settings(val_fraction: float, max_val: int | None, seed: int, hold_out_test: bool) -> dict:
    return {"val_fraction": float(val_fraction), "max_val": max_val, "seed": int(seed), "hold_out_test": hold_out_test}


def _read(path: Path, task: str, n: int, digest: str, settings: dict) -> SplitIndices:
    redo = f"delete {path} to split again, or give another split_dir"
    try:
        data = json.loads(path.read_text())
        stored = {k: data[k] for k in settings}
        names = ("train", "val") if data["test"] is None else ("train", "val", "test")
        parts = {k: np.asarray(data[k], dtype=np.int64).reshape(-1) for k in names}
        file_n, file_digest = int(data["num_samples"]), str(data["labels_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TvqError(f"{task}: split file {path} is unreadable ({type(e).__name__}); {redo}") from None
    if file_n != n or file_digest != digest:
        raise TvqError(f"{task}: split file {path} was made for another training set ({file_n} samples, labels "
                       f"{file_digest[:12]}) than the one read now ({n} samples, labels {digest[:12]}); {redo}")
    if stored != settings:
        diff = ", ".join(f"{k}={stored[k]!r} (asked {settings[k]!r})" for k in settings if stored[k] != settings[k])
        raise TvqError(f"{task}: split file {path} was made with {diff}; {redo}")
    every = np.concatenate(list(parts.values()))
    if len(every) != n or (len(every) and (every.min() < 0 or every.max() >= n)) or len(np.unique(every)) != n:
        raise TvqError(f"{task}: split file {path} does not divide the {n} training samples into disjoint parts; "
                       f"{redo}")
    return SplitIndices(parts["train"], parts["val"], parts.get("test"))


def _write(path: Path, task: str, n: int, digest: str, settings: dict, split: SplitIndices) -> None:
    data = {"version": SPLIT_VERSION, "task": task, "num_samples": n, "labels_sha256": digest, **settings,
            "method": "torch.randperm(n, generator=torch.Generator().manual_seed(seed)): train | val | test",
            "train": split.train.tolist(), "val": split.val.tolist(),
            "test": None if split.test is None else split.test.tolist()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)   # concurrent ranks write the same content
    except OSError as e:
        raise TvqError(f"{task}: cannot write split file {path} ({e.strerror or e}); "
                       "give a writable split_dir") from None


def load_or_make_split(task: str, labels: np.ndarray, split_dir: str | Path | None = None, val_fraction: float = 0.1,
                       max_val: int | None = 5000, seed: int = SPLIT_SEED, hold_out_test: bool = False) -> SplitIndices:
    """The task's split from its split file, made (and written) on first use.

    ``labels``: the raw training set's labels in order (size and digest are checked).
    """
    path = split_file(split_dir or default_split_dir(), task)
    labels = np.asarray(labels)
    n, digest = len(labels), labels_digest(labels)
    settings = _settings(val_fraction, max_val, seed, hold_out_test)
    if path.exists():
        return _read(path, task, n, digest, settings)
    split = partition(n, val_fraction, max_val, seed, hold_out_test)
    _write(path, task, n, digest, settings, split)
    return split
