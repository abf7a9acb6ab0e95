"""Scenes: what an image of the embedded benchmark shows, how it is drawn, and how it is described.

A :class:`Scene` names the factors (objects' shape, colour, count, size and grid position, a
grating's orientation, a digit, a bright quadrant, the background style); :func:`render` draws
it, drawing the nuisance factors (exact positions, jitter, background colours) from the
generator; :func:`caption` writes a sentence about a random subset of its factors, the way web
captions mention some of what a photo shows. Pre-training samples scenes from a broad mixture
(:func:`sample_pretraining_scene`); each downstream task samples from its own narrow distribution
(:mod:`.tasks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import render as R

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
           "ring": "rings", "diamond": "diamonds"}
_GENERIC = (("object", "objects"), ("shape", "shapes"), ("thing", "things"))


@dataclass(frozen=True)
class Scene:
    background: str = "plain"
    shape: str | None = None
    colour: str | None = None
    count: int = 0
    size: int = 2                 # index into render.SIZE_WORDS
    position: int | None = None   # 3 x 3 grid cell of a single object
    centred: bool = False         # a single object near the centre (jitter +-3 px)
    orientation: int | None = None
    grating_colour: str = "white"
    digit: int | None = None      # the digit's class
    digit_image: np.ndarray | None = None
    digit_colour: str = "white"
    quadrant: int | None = None
    distractors: int = 0          # tiny unnamed objects
    # how hard the scene is to read (the defaults are the pre-training mixture's)
    contrast: tuple[float, float] = (0.6, 1.0)     # grating contrast range
    brightness: tuple[float, float] = (0.3, 0.45)  # bright-quadrant increment range
    fade: float = 0.0                               # objects' and digits' colours mixed towards grey
    noise: float = 0.0                              # std of Gaussian pixel noise added last


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw ``scene`` as ``uint8 [32, 32, 3]``."""
    canvas = R.background(rng, scene.background)
    if scene.orientation is not None:
        canvas = R.grating(rng, scene.orientation, R.colour(rng, scene.grating_colour), canvas, scene.contrast)
    if scene.digit_image is not None:
        off = 32 - scene.digit_image.shape[0] * 3
        R.digit(canvas, scene.digit_image, R.colour(rng, scene.digit_colour, scene.fade), int(rng.integers(0, off + 1)),
                int(rng.integers(0, off + 1)))
    if scene.count:
        lo, hi = R.SIZE_RADII[scene.size]
        r = float(rng.uniform(lo, hi))
        if scene.position is not None:
            centres = R.place(rng, 1, r, R.cell_box(scene.position, r))
        elif scene.centred:
            centres = [(16 + rng.uniform(-3, 3), 16 + rng.uniform(-3, 3))]
        else:
            centres = R.place(rng, scene.count, r)
        rgb = R.colour(rng, scene.colour, scene.fade)
        for cx, cy in centres:
            R.paint(canvas, R.shape_mask(scene.shape, cx, cy, r), rgb)
    for cx, cy in (R.place(rng, scene.distractors, 2.0) if scene.distractors else []):
        R.paint(canvas, R.shape_mask(R.SHAPES[rng.integers(len(R.SHAPES))], cx, cy, 2.0),
                R.colour(rng, R.COLOUR_NAMES[rng.integers(len(R.COLOUR_NAMES))]))
    if scene.quadrant is not None:
        canvas = R.brighten_quadrant(canvas, scene.quadrant, float(rng.uniform(*scene.brightness)))
    if scene.noise > 0:
        canvas = canvas + rng.normal(0.0, scene.noise, canvas.shape).astype(np.float32)
    return R.to_uint8(canvas)


def _object_phrase(s: Scene, rng: np.random.Generator) -> str:
    words = []
    plural = s.count > 1
    words.append(R.COUNT_WORDS[s.count - 1] if plural else ("a" if rng.random() < 0.7 else "one"))
    if rng.random() < 0.75:
        words.append(R.SIZE_WORDS[s.size])
    if rng.random() < 0.8:
        words.append(s.colour)
    if rng.random() < 0.75:
        words.append(_PLURAL[s.shape] if plural else s.shape)
    else:
        words.append(_GENERIC[rng.integers(3)][int(plural)])
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A sentence about a random subset (at least one) of the scene's factors."""
    phrases: list[str] = []
    if scene.count:
        obj = _object_phrase(scene, rng)
        if scene.position is not None and rng.random() < 0.85:
            obj += f" in the {R.POSITIONS[scene.position]}"
        phrases.append(obj)
    if scene.orientation is not None:
        phrases.append(f"a {R.ORIENTATIONS[scene.orientation]} grating" if rng.random() < 0.8
                       else f"{R.ORIENTATIONS[scene.orientation]} stripes")
    if scene.digit is not None:
        word = R.DIGIT_WORDS[scene.digit]
        d = f"the digit {word}" if rng.random() < 0.6 else f"the number {word}"
        if rng.random() < 0.4:
            d += f" in {scene.digit_colour}"
        phrases.append(d)
    if scene.quadrant is not None:
        phrases.append(f"a bright {R.QUADRANTS[scene.quadrant]} quadrant")
    if rng.random() < 0.5 or not phrases:
        phrases.append(f"a {scene.background} background")
    keep = [p for p in phrases if rng.random() < 0.8] or [phrases[int(rng.integers(len(phrases)))]]
    if len(keep) > 1 and rng.random() < 0.3:
        keep = keep[::-1]
    first, rest = keep[0], keep[1:]
    glue = {"background": "on", "quadrant": "with"}
    words = [first] + [f"{next((g for k, g in glue.items() if p.endswith(k)), 'and')} {p}" for p in rest]
    return " ".join(words)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_pretraining_scene(rng: np.random.Generator, digits: tuple[np.ndarray, np.ndarray]) -> Scene:
    """One scene of the broad pre-training mixture (objects 50 %, gratings 20 %, digits 20 %, quadrants 10 %)."""
    kind = rng.random()
    bg = _pick(rng, R.BACKGROUNDS)
    shape, col = _pick(rng, R.SHAPES), _pick(rng, R.COLOUR_NAMES)
    quadrant = int(rng.integers(4)) if rng.random() < 0.2 else None
    if kind < 0.5:
        count = int(rng.integers(1, 7))
        size = int(rng.integers(0, 5)) if count == 1 else int(rng.integers(0, (3, 2, 1, 1, 1)[count - 2]))
        position = int(rng.integers(9)) if count == 1 and size <= 1 and rng.random() < 0.5 else None
        return Scene(bg, shape, col, count, size, position, quadrant=quadrant)
    if kind < 0.7:
        extra = rng.random() < 0.4
        return Scene(_pick(rng, ("plain", "noisy", "gradient")), shape if extra else None, col if extra else None,
                     int(extra), int(rng.integers(0, 2)), orientation=int(rng.integers(8)),
                     grating_colour=_pick(rng, R.COLOUR_NAMES))
    if kind < 0.9:
        i = int(rng.integers(len(digits[1])))
        return Scene(bg, digit=int(digits[1][i]), digit_image=digits[0][i], digit_colour=_pick(rng, R.COLOUR_NAMES),
                     quadrant=quadrant)
    return Scene(_pick(rng, ("plain", "gradient")), quadrant=int(rng.integers(4)), distractors=int(rng.integers(0, 3)))
