"""The closed word vocabulary of the embedded benchmark's captions and prompt templates."""
from __future__ import annotations

from . import render as R
from .tasks import TASKS

_GLUE = ("a an one the in on and with of background grating stripes digit number bright quadrant object objects "
         "shape shapes thing things something picture large tiny circles squares triangles crosses rings diamonds")


def vocabulary() -> list[str]:
    """Every word a caption or a task's prompt can contain, sorted (the tokenizer's vocabulary)."""
    words: set[str] = set(_GLUE.split())
    for group in (R.SHAPES, R.COLOUR_NAMES, R.COUNT_WORDS, R.SIZE_WORDS, R.POSITIONS, R.ORIENTATIONS, R.QUADRANTS,
                  R.BACKGROUNDS, R.DIGIT_WORDS):
        for name in group:
            words.update(name.split())
    for spec in TASKS.values():
        for template in spec.templates:
            words.update(w for w in template.split() if w != "{}")
    return sorted(words)
