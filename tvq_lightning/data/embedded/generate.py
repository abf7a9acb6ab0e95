"""Deterministic generation and on-disk caching of the embedded benchmark's images.

``task_split(task, split, seed)`` and ``caption_pairs(n, seed)`` return ``uint8 [N, 32, 32, 3]``
images (plus labels or captions), generated from a seed and cached as ``.npz`` under
``$TVQ_CACHE_DIR`` (default ``~/.cache/tvq_lightning``)/``embedded``. Cache files are keyed on
:data:`GENERATOR_VERSION` (pre-training pairs) or :data:`TASKS_VERSION` (task splits), the seed and
the sizes: bump the version whenever the code changes what a seed produces. Digits come from ``sklearn.datasets.load_digits`` (bundled with
scikit-learn, no download); a fixed permutation splits its 1797 images into a part for
pre-training and training splits and a disjoint part for validation and test splits.
"""
from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...runtime import cache_root
from ...errors import TvqError
from .render import downstream_shift
from .scenes import caption, render, sample_pretraining_scene
from .tasks import TASK_NAMES, TASKS

GENERATOR_VERSION = 1   # the pre-training scenes (the shipped θ0 was trained on version 1)
TASKS_VERSION = 3       # the downstream tasks' distributions
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 3000, "val": 200, "test": 400}
MEAN, STD = 0.5, 0.25


def cache_dir() -> Path:
    return cache_root() / "embedded"


@cache
def digits(part: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8 x 8 digits, ``part`` = ``"fit"`` (pre-training, train splits) or ``"eval"`` (val, test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise TvqError("the embedded benchmark's digits task needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    order = np.random.default_rng(1234).permutation(len(d.target))
    idx = order[:1200] if part == "fit" else order[1200:]
    return d.images[idx].astype(np.float32), d.target[idx].astype(np.int64)


def _rng(*key: int | str) -> np.random.Generator:
    words = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in key]
    return np.random.default_rng(words)


def _cached(name: str, make):
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            pass  # a damaged cache file is regenerated
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def task_split(task: str, split: str, seed: int = 0, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], labels int64 [N])`` of one task's split, classes balanced."""
    if task not in TASKS:
        raise TvqError(f"unknown embedded task {task!r}; choose from {', '.join(TASK_NAMES)}")
    if split not in SPLITS:
        raise TvqError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    n = SPLIT_SIZES[split] if size is None else size
    spec = TASKS[task]

    def make():
        rng = _rng(TASKS_VERSION, seed, task, split)
        labels = rng.permutation(np.arange(n) % spec.num_classes)
        pool = digits("fit" if split == "train" else "eval")
        images = downstream_shift(np.stack([render(spec.scene(rng, int(y), pool), rng) for y in labels])) if n \
            else np.zeros((0, 32, 32, 3), np.uint8)
        return {"images": images, "labels": labels.astype(np.int64)}

    z = _cached(f"tasks-v{TASKS_VERSION}-seed{seed}-{task}-{split}-{n}", make)
    return z["images"], z["labels"]


def caption_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` pre-training images and their captions, drawn from the broad scene mixture."""
    def make():
        rng = _rng(GENERATOR_VERSION, seed, "pretrain")
        pool = digits("fit")
        images, caps = [], []
        for _ in range(n):
            scene = sample_pretraining_scene(rng, pool)
            images.append(render(scene, rng))
            caps.append(caption(scene, rng))
        return {"images": np.stack(images), "captions": np.asarray(caps)}

    z = _cached(f"v{GENERATOR_VERSION}-seed{seed}-pretrain-{n}", make)
    return z["images"], [str(c) for c in z["captions"]]


def to_tensor(images: np.ndarray) -> Tensor:
    """``uint8 [N, H, W, 3]`` -> normalised ``float32 [N, 3, H, W]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(MEAN).div_(STD)
