"""Drawing primitives of the embedded benchmark: pure numpy on ``float32 [H, W, 3]`` canvases in [0, 1].

Every function takes a ``numpy.random.Generator`` where it draws anything, so a scene is a
deterministic function of its generator's state. The vocabulary (shape, colour, size,
orientation, position and quadrant names) lives here too: the captions, the task class names and
the renderer must agree on it.
"""
from __future__ import annotations

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (0.92, 0.12, 0.10), "green": (0.12, 0.78, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10), "cyan": (0.10, 0.88, 0.90), "magenta": (0.90, 0.12, 0.88),
    "white": (0.97, 0.97, 0.97), "orange": (1.00, 0.55, 0.05),
}
COLOUR_NAMES = tuple(COLOURS)
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
SIZE_WORDS = ("tiny", "small", "medium", "large", "huge")
SIZE_RADII = ((2.0, 3.0), (3.5, 4.5), (5.5, 6.5), (7.5, 9.0), (10.5, 12.5))
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
ORIENTATIONS = ("horizontal", "slightly rising", "rising diagonal", "steeply rising", "vertical",
                "steeply falling", "falling diagonal", "slightly falling")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("plain", "gradient", "striped", "noisy", "checkered")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _dark(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 0.42, 3).astype(np.float32)


def background(rng: np.random.Generator, style: str) -> np.ndarray:
    """A dark background of ``style`` (one of :data:`BACKGROUNDS`)."""
    a, b = _dark(rng), _dark(rng)
    if style == "plain":
        return np.broadcast_to(a, (SIZE, SIZE, 3)).copy()
    if style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = ((_XX - SIZE / 2) * np.cos(angle) + (_YY - SIZE / 2) * np.sin(angle)) / SIZE + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (a * (1 - t) + b * t).astype(np.float32)
    if style == "striped":
        period = rng.integers(4, 9)
        coord = _YY if rng.random() < 0.5 else _XX
        m = ((coord // (period / 2)) % 2)[..., None]
        return (a * (1 - m) + b * m).astype(np.float32)
    if style == "noisy":
        return np.clip(a + rng.normal(0, 0.12, (SIZE, SIZE, 3)), 0, 1).astype(np.float32)
    if style == "checkered":
        period = rng.integers(4, 9)
        m = (((_YY // (period / 2)) + (_XX // (period / 2))) % 2)[..., None]
        return (a * (1 - m) + b * m).astype(np.float32)
    raise ValueError(f"unknown background style {style!r}; choose one of {BACKGROUNDS}")


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean ``[H, W]`` mask of ``shape`` centred at (cx, cy) with radius r."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "cross":
        w = max(r / 3.0, 0.75)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def colour(rng: np.random.Generator, name: str, fade: float = 0.0) -> np.ndarray:
    """The named colour with a little jitter, mixed by ``fade`` towards mid grey."""
    rgb = np.clip(np.asarray(COLOURS[name], np.float32) + rng.uniform(-0.07, 0.07, 3), 0, 1)
    return (rgb * (1 - fade) + 0.5 * fade).astype(np.float32)


def paint(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> None:
    canvas[mask] = rgb


def place(rng: np.random.Generator, n: int, r: float, box: tuple[float, float, float, float] | None = None,
          restarts: int = 100, tries: int = 30) -> list[tuple[float, float]]:
    """``n`` centres for objects of radius ``r`` that do not touch each other (rejection sampling,
    restarted when a greedy layout gets stuck)."""
    x0, y0, x1, y1 = box or (r + 0.5, r + 0.5, SIZE - r - 0.5, SIZE - r - 0.5)
    gap = (2 * r + 1.5) ** 2
    for _ in range(restarts):
        out: list[tuple[float, float]] = []
        for _ in range(tries * n):
            cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if all((cx - px) ** 2 + (cy - py) ** 2 >= gap for px, py in out):
                out.append((cx, cy))
                if len(out) == n:
                    return out
    raise RuntimeError(f"cannot place {n} objects of radius {r} without overlap")


def cell_box(position: int, r: float) -> tuple[float, float, float, float]:
    """The region of grid cell ``position`` (3 x 3, row-major) where a centre of radius ``r`` fits."""
    row, col = divmod(position, 3)
    w = SIZE / 3
    lo_x, lo_y = col * w + r * 0.5, row * w + r * 0.5
    hi_x, hi_y = (col + 1) * w - r * 0.5, (row + 1) * w - r * 0.5
    lo_x, lo_y = max(lo_x, r), max(lo_y, r)
    hi_x, hi_y = min(hi_x, SIZE - r), min(hi_y, SIZE - r)
    return lo_x, lo_y, max(hi_x, lo_x + 1e-3), max(hi_y, lo_y + 1e-3)


def grating(rng: np.random.Generator, orientation: int, rgb: np.ndarray, base: np.ndarray,
            contrast: tuple[float, float] = (0.6, 1.0)) -> np.ndarray:
    """A sinusoidal grating at ``orientation`` * 22.5 degrees (0 = horizontal bars) over ``base``."""
    theta = np.deg2rad(orientation * 22.5 + rng.uniform(-4, 4))
    period = rng.uniform(4.0, 7.0)
    # bars run along direction theta: the wave varies along its normal
    u = -_XX * np.sin(theta) + _YY * np.cos(theta)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    t = (rng.uniform(*contrast) * wave)[..., None].astype(np.float32)
    return base * (1 - t) + rgb * t


def digit(canvas: np.ndarray, image8: np.ndarray, rgb: np.ndarray, ox: int, oy: int, scale: int = 3) -> None:
    """Alpha-blend an 8 x 8 sklearn digit (values 0-16), upscaled ``scale`` x, at offset (ox, oy)."""
    alpha = np.kron(image8 / 16.0, np.ones((scale, scale), np.float32)).astype(np.float32)[..., None]
    h, w = alpha.shape[:2]
    region = canvas[oy:oy + h, ox:ox + w]
    canvas[oy:oy + h, ox:ox + w] = region * (1 - alpha) + rgb * alpha


def brighten_quadrant(canvas: np.ndarray, quadrant: int, amount: float) -> np.ndarray:
    """Add ``amount`` to every channel of quadrant ``quadrant`` (see :data:`QUADRANTS`)."""
    h = SIZE // 2
    row, col = divmod(quadrant, 2)
    canvas[row * h:(row + 1) * h, col * h:(col + 1) * h] += amount
    return np.clip(canvas, 0, 1)


def downstream_shift(images: np.ndarray) -> np.ndarray:
    """The domain shift every downstream task shares (``uint8 [N, H, W, 3]`` -> same): contrast
    compressed towards grey, a warm colour cast and a slight blur — the way CLIP's downstream sets
    (low-resolution, scanned, re-encoded) differ from its web pre-training images as a group."""
    x = images.astype(np.float32) / 255.0
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blur = (p[:, 1:-1, 1:-1] * 4 + p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]) / 8.0
    x = 0.5 + 0.65 * (blur - 0.5) + np.asarray([0.07, 0.03, -0.05], np.float32)
    return to_uint8(x)


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
