"""Scene distributions: what a room, its camera, light, textures and objects are drawn from.

A scene batch is a dict of numpy arrays with a leading batch axis ``B`` (see :func:`sample_scenes`);
each object type has ``K`` slots (the most any scene of the batch has) and a ``mask`` of the slots in
use. Two distributions ship:

- :data:`TASKS_SPEC` (the downstream benchmark): textured floor and walls (checker / stripes), rugs
  and pictures, 2-6 objects, camera 1.0-2.2 m high;
- :data:`PRETRAIN_SPEC` (θ0's pre-training only): plain floor and walls, no rugs or pictures,
  1-4 objects, a lower camera (0.5-1.2 m) and more pixel noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Semantic classes (the segmentation task's label values); -1 (void, above the walls) is ignored.
CLASSES = ("floor", "wall", "rug", "picture", "box", "sphere", "cylinder")
OBJECT_TYPES = ("box", "sphere", "cylinder")
COLOUR_BINS = 6   # object hues fall in 6 bins of 60 degrees (the pre-training labels)


@dataclass(frozen=True)
class SceneSpec:
    """Ranges (low, high) of a scene distribution; angles in degrees, lengths in metres."""
    camera_height: tuple[float, float] = (1.0, 2.2)
    tilt: tuple[float, float] = (5.0, 35.0)
    fov: tuple[float, float] = (50.0, 75.0)
    yaw: tuple[float, float] = (-25.0, 25.0)
    objects: tuple[int, int] = (2, 6)
    textured: bool = True
    rug: float = 0.5        # probability of a rug on the floor
    picture: float = 0.6    # probability of a picture on the back wall
    noise: tuple[float, float] = (0.01, 0.04)


TASKS_SPEC = SceneSpec()
PRETRAIN_SPEC = SceneSpec(camera_height=(0.5, 1.2), tilt=(0.0, 25.0), objects=(1, 4), textured=False, rug=0.0,
                          picture=0.0, noise=(0.04, 0.12))


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB ``(..., 3)``."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h[..., None]) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _u(rng: np.random.Generator, lo_hi, shape=()) -> np.ndarray:
    return rng.uniform(lo_hi[0], lo_hi[1], shape)


def _muted(rng: np.random.Generator, shape) -> np.ndarray:
    """Room colours: weakly saturated, mid to bright."""
    return hsv_to_rgb(rng.random(shape), rng.uniform(0.0, 0.45, shape), rng.uniform(0.35, 0.95, shape))


def _texture(rng: np.random.Generator, b: int, textured: bool, scale: tuple[float, float]) -> dict[str, np.ndarray]:
    """A pattern per scene: kind 0 plain, 1 checker, 2 / 3 stripes along the first / second coordinate."""
    kind = rng.integers(0, 4, b) if textured else np.zeros(b, np.int64)
    return {"kind": kind, "scale": _u(rng, scale, b), "colours": _muted(rng, (b, 2))}


def _objects(rng, b, counts, cam, room, k):
    """Object slots of one type: a place in view on the floor, a colour (hue bin) and sizes."""
    ang = np.deg2rad(rng.uniform(-28, 28, (b, k))) + cam["yaw"][:, None]
    z = 1.6 + rng.random((b, k)) * (room["back"][:, None] - 2.2)
    x = np.clip(z * np.tan(ang), room["left"][:, None] + 0.6, room["right"][:, None] - 0.6)
    hue = rng.random((b, k))
    colour = hsv_to_rgb(hue, rng.uniform(0.55, 1.0, (b, k)), rng.uniform(0.5, 1.0, (b, k)))
    mask = np.arange(k)[None] < counts[:, None]
    return {"x": x, "z": z, "hue": hue, "bin": np.minimum((hue * COLOUR_BINS).astype(np.int64), COLOUR_BINS - 1),
            "colour": colour, "mask": mask}


def sample_scenes(rng: np.random.Generator, b: int, spec: SceneSpec = TASKS_SPEC) -> dict:
    """``b`` scenes of distribution ``spec``: nested dicts of arrays (``camera``, ``room``, ``light``,
    ``floor`` / ``wall`` textures, ``rug``, ``picture``, and ``box`` / ``sphere`` / ``cylinder`` slots)."""
    cam = {"yaw": np.deg2rad(_u(rng, spec.yaw, b)), "tilt": np.deg2rad(_u(rng, spec.tilt, b)),
           "fov": np.deg2rad(_u(rng, spec.fov, b))}
    cam["pos"] = np.stack([np.zeros(b), _u(rng, spec.camera_height, b), np.zeros(b)], -1)
    room = {"back": rng.uniform(4.5, 8.0, b), "left": -rng.uniform(2.0, 4.0, b), "right": rng.uniform(2.0, 4.0, b),
            "height": rng.uniform(2.8, 4.0, b)}
    light = np.stack([rng.uniform(-1, 1, b), rng.uniform(0.6, 1.6, b), rng.uniform(-1.2, 0.2, b)], -1)
    scene = {"camera": cam, "room": room,
             "light": {"dir": light / np.linalg.norm(light, axis=-1, keepdims=True), "ambient": rng.uniform(0.2, 0.5, b),
                       "falloff": rng.uniform(0.0, 0.08, b), "gain": rng.uniform(0.8, 1.2, b),
                       "noise": _u(rng, spec.noise, b), "void": rng.uniform(0.02, 0.15, b)},
             "floor": _texture(rng, b, spec.textured, (0.3, 0.9)), "wall": _texture(rng, b, spec.textured, (0.2, 0.8))}
    for name, prob in (("rug", spec.rug), ("picture", spec.picture)):
        scene[name] = {"present": rng.random(b) < prob, "centre": np.stack([rng.uniform(-1.2, 1.2, b),
                       rng.uniform(1.8, 3.5, b) if name == "rug" else rng.uniform(1.1, 1.8, b)], -1),
                       "half": rng.uniform(0.3, 0.9, (b, 2)) if name == "rug" else rng.uniform(0.25, 0.6, (b, 2)),
                       **_texture(rng, b, True, (0.1, 0.3))}
        scene[name]["kind"] = np.maximum(scene[name]["kind"], 1)
        scene[name]["colours"] = hsv_to_rgb(rng.random((b, 2)), rng.uniform(0.4, 0.9, (b, 2)), rng.uniform(0.3, 0.9, (b, 2)))
    n = rng.integers(spec.objects[0], spec.objects[1] + 1, b)
    kinds = rng.integers(0, 3, (b, spec.objects[1]))
    counts = [np.sum((kinds == i) & (np.arange(spec.objects[1])[None] < n[:, None]), 1) for i in range(3)]
    for i, name in enumerate(OBJECT_TYPES):
        k = int(counts[i].max()) if b else 0
        o = _objects(rng, b, counts[i], cam, room, k)
        if name == "box":
            o["half"] = np.stack([rng.uniform(0.2, 0.6, (b, k)), rng.uniform(0.2, 0.8, (b, k)),
                                  rng.uniform(0.2, 0.6, (b, k))], -1)
            o["yaw"] = rng.uniform(0, np.pi, (b, k))
            o["centre"] = np.stack([o["x"], o["half"][..., 1], o["z"]], -1)
        elif name == "sphere":
            o["radius"] = rng.uniform(0.2, 0.55, (b, k))
            o["centre"] = np.stack([o["x"], o["radius"], o["z"]], -1)
        else:
            o["radius"] = rng.uniform(0.12, 0.4, (b, k))
            o["height"] = rng.uniform(0.3, 1.6, (b, k))
            o["base"] = np.stack([o["x"], np.zeros((b, k)), o["z"]], -1)
        scene[name] = o
    return scene
