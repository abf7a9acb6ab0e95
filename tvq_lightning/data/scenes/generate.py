"""Deterministic generation and caching of the dense scene benchmark, and the pre-training stream.

- :func:`scene_split` ``(split, seed, size, image_size)``: one split's images and *all three* tasks'
  targets (the tasks share the images, as NYUv2's do), cached as ``.npz`` beside the classification
  benchmark's (``$TVQ_CACHE_DIR``, default ``~/.cache/tvq_lightning``, ``/embedded/scenes-v*``), keyed on
  :data:`SCENES_VERSION`, the seed, the split's size and the resolution. Depth and normals are
  cached as float16 (relative error under 5e-4) and returned as float32, normals renormalised.
- :func:`pretrain_chunk` / :func:`pretrain_stream`: θ0's pre-training images of
  :data:`~.sampling.PRETRAIN_SPEC` with their 9 presence labels (:data:`PRETRAIN_LABELS`), in
  chunks keyed on :data:`PRETRAIN_VERSION`, the seed and the chunk's index, so a stream is the same
  whatever the number of worker processes rendering it.

Every chunk of :data:`CHUNK` scenes draws from its own generator, so the data do not depend on how
generation is split or parallelised. Bump a version whenever the code changes what a seed produces.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
from collections.abc import Iterator

import numpy as np

from ...errors import TvqError
from ..embedded.generate import _cached, _rng
from .render import render
from .sampling import COLOUR_BINS, OBJECT_TYPES, PRETRAIN_SPEC, TASKS_SPEC, SceneSpec, sample_scenes

SCENES_VERSION = 1     # the benchmark's scenes (TASKS_SPEC and the renderer)
PRETRAIN_VERSION = 1   # θ0's pre-training scenes (PRETRAIN_SPEC, the labels)
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}
IMAGE_SIZE = 64
CHUNK = 32
PRETRAIN_LABELS = tuple(OBJECT_TYPES) + tuple(f"hue{i * 360 // COLOUR_BINS}" for i in range(COLOUR_BINS))


def render_chunk(key: tuple, n: int, image_size: int, spec: SceneSpec) -> tuple[dict, dict]:
    """``n`` scenes of ``spec`` drawn from the generator of ``key``, rendered: ``(scene, arrays)``."""
    rng = _rng(*key)
    scene = sample_scenes(rng, n, spec)
    return scene, render(scene, (image_size, image_size), rng)


def generate(key: tuple, n: int, image_size: int = IMAGE_SIZE, spec: SceneSpec = TASKS_SPEC) -> dict[str, np.ndarray]:
    """``n`` rendered scenes (all :func:`.render.render` outputs but ``object``), chunk ``i`` from ``key + (i,)``."""
    parts = [render_chunk(key + (i,), min(CHUNK, n - start), image_size, spec)[1]
             for i, start in enumerate(range(0, n, CHUNK))]
    if not parts:
        return {"image": np.zeros((0, image_size, image_size, 3), np.uint8)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "object"}


def scene_split(split: str, seed: int = 0, size: int | None = None, image_size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """One split: ``image`` uint8 ``(N, H, W, 3)``, ``label`` int64 ``(N, H, W)`` (-1 void), ``depth``
    float32 ``(N, H, W)`` (0 void) and ``normal`` float32 ``(N, H, W, 3)`` (camera frame; 0 void)."""
    if split not in SPLITS:
        raise TvqError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    n = SPLIT_SIZES[split] if size is None else int(size)

    def make():
        z = generate((SCENES_VERSION, seed, "scenes", split), n, image_size)
        if not n:
            h = image_size
            z = {"image": z["image"], "label": np.zeros((0, h, h), np.int8), "depth": np.zeros((0, h, h)),
                 "normal": np.zeros((0, h, h, 3))}
        return {"image": z["image"], "label": z["label"], "depth": z["depth"].astype(np.float16),
                "normal": z["normal"].astype(np.float16)}

    z = _cached(f"scenes-v{SCENES_VERSION}-seed{seed}-{split}-{n}-{image_size}px", make)
    normal = z["normal"].astype(np.float32)
    length = np.linalg.norm(normal, axis=-1, keepdims=True)
    normal = np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)
    return {"image": z["image"], "label": z["label"].astype(np.int64), "depth": z["depth"].astype(np.float32),
            "normal": normal}


def presence_labels(scene: dict, objects: np.ndarray, min_pixels: int) -> np.ndarray:
    """θ0's targets ``(B, 9)`` float32: which object types, which hue bins cover ``min_pixels`` or more."""
    types = np.concatenate([np.full(scene[t]["bin"].shape[1], i) for i, t in enumerate(OBJECT_TYPES)]).astype(np.int64)
    bins = np.concatenate([scene[t]["bin"] for t in OBJECT_TYPES], 1)                  # (B, K)
    flat = objects.reshape(len(objects), -1)
    visible = np.stack([(flat == k).sum(1) >= min_pixels for k in range(len(types))], 1) if len(types) \
        else np.zeros((len(objects), 0), bool)
    out = np.zeros((len(objects), len(PRETRAIN_LABELS)), np.float32)
    for k in range(len(types)):
        out[visible[:, k], types[k]] = 1.0
        rows = np.nonzero(visible[:, k])[0]
        out[rows, len(OBJECT_TYPES) + bins[rows, k]] = 1.0
    return out


def pretrain_chunk(seed: int, index: int, n: int = CHUNK, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``index`` of the pre-training stream: ``(images uint8 (n, H, W, 3), labels float32 (n, 9))``."""
    scene, out = render_chunk((PRETRAIN_VERSION, seed, "pretrain", index), n, image_size, PRETRAIN_SPEC)
    return out["image"], presence_labels(scene, out["object"], max(2, round(6 * image_size ** 2 / 4096)))


def _pretrain_job(args):
    return pretrain_chunk(*args)


def pretrain_stream(seed: int, chunk: int, image_size: int = IMAGE_SIZE, workers: int = 0,
                    start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks ``start, start + 1, ...`` of the pre-training stream, in order, forever; rendered by
    ``workers`` spawned processes (0: in this one), at most ``4 * workers`` chunks ahead of the
    consumer. The same chunks whatever ``workers`` is."""
    jobs = ((seed, i, chunk, image_size) for i in itertools.count(start))
    if workers <= 0:
        yield from map(_pretrain_job, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        pending = collections.deque(pool.apply_async(_pretrain_job, (next(jobs),)) for _ in range(4 * workers))
        while True:
            result = pending.popleft().get()
            pending.append(pool.apply_async(_pretrain_job, (next(jobs),)))
            yield result
