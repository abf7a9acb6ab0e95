"""The eight downstream tasks of the embedded benchmark.

Each task names one factor of a :class:`~.scenes.Scene` as its label and draws every other factor
from its own distribution (background styles, object sizes, distractors), so the tasks differ in
input distribution and label space the way SUN397, SVHN and GTSRB do. Each has class names and
prompt templates for CLIP zero-shot heads, in the words of the pre-training captions. Like real
downstream sets, several are harder to read than the pre-training images (faded colours, low-contrast
gratings, subtle bright quadrants, clutter, pixel noise): zero-shot transfer is partial.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import render as R
from .scenes import Scene, _pick


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    scene: Callable[[np.random.Generator, int, tuple[np.ndarray, np.ndarray]], Scene]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _any(rng, seq):
    return _pick(rng, seq)


def _shapes(rng, y, _):
    return Scene(_any(rng, ("noisy", "gradient", "striped")), R.SHAPES[y], _any(rng, R.COLOUR_NAMES), 1,
                 int(rng.integers(2, 4)), centred=True)


def _colours(rng, y, _):
    return Scene(_any(rng, ("noisy", "checkered", "striped")), _any(rng, R.SHAPES), R.COLOUR_NAMES[y],
                 int(rng.integers(1, 4)), int(rng.integers(0, 2)), distractors=int(rng.integers(1, 3)), fade=0.35,
                 noise=0.06)


def _counts(rng, y, _):
    return Scene(_any(rng, ("plain", "gradient")), _any(rng, R.SHAPES), _any(rng, R.COLOUR_NAMES), y + 1, 0,
                 noise=0.04)


def _positions(rng, y, _):
    return Scene(_any(rng, ("striped", "noisy", "plain")), _any(rng, R.SHAPES), _any(rng, R.COLOUR_NAMES), 1,
                 int(rng.integers(0, 2)), position=y)


def _gratings(rng, y, _):
    return Scene(_any(rng, ("plain", "noisy")), orientation=y, grating_colour=_any(rng, R.COLOUR_NAMES),
                 distractors=int(rng.integers(0, 3)), contrast=(0.12, 0.3), noise=0.08)


def _sizes(rng, y, _):
    return Scene(_any(rng, ("plain", "checkered", "gradient")), _any(rng, R.SHAPES), _any(rng, R.COLOUR_NAMES), 1, y,
                 centred=True, noise=0.05)


def _digits(rng, y, digits):
    images, labels = digits
    pool = np.flatnonzero(labels == y)
    return Scene(_any(rng, R.BACKGROUNDS), digit=y, digit_image=images[pool[int(rng.integers(len(pool)))]],
                 digit_colour=_any(rng, R.COLOUR_NAMES), fade=0.3, noise=0.05)


def _quadrants(rng, y, _):
    return Scene(_any(rng, ("noisy", "gradient", "checkered")), quadrant=y, distractors=int(rng.integers(1, 4)),
                 brightness=(0.06, 0.14), noise=0.06)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("shapes", R.SHAPES, ("a {}", "a picture of a {}", "a large {}"), _shapes),
    TaskSpec("colours", R.COLOUR_NAMES, ("a {} object", "{} shapes", "something {}"), _colours),
    TaskSpec("counts", R.COUNT_WORDS, ("{} objects", "{} tiny shapes", "{} things"), _counts),
    TaskSpec("positions", R.POSITIONS, ("an object in the {}", "a shape in the {}", "something in the {}"), _positions),
    TaskSpec("gratings", R.ORIENTATIONS, ("a {} grating", "{} stripes"), _gratings),
    TaskSpec("sizes", R.SIZE_WORDS, ("a {} object", "a {} shape", "one {} thing"), _sizes),
    TaskSpec("digits", R.DIGIT_WORDS, ("the digit {}", "the number {}"), _digits),
    TaskSpec("quadrants", R.QUADRANTS, ("a bright {} quadrant", "a plain background with a bright {} quadrant"),
             _quadrants),
)}
TASK_NAMES = tuple(TASKS)
