"""Render a batch of scenes (:func:`.sampling.sample_scenes`): RGB and exact per-pixel targets.

Surfaces, in order: floor (``y = 0``), back wall (``z = back``), left / right walls
(``x = left / right``), then the boxes, spheres and cylinders. Walls end at the room's height; a
ray that leaves the room above them is *void*: label -1, depth 0, normal (0, 0, 0), a dark colour.
Each ray keeps its nearest hit: depth is that hit's camera-frame ``z`` (the ray parameter, see
:mod:`.camera`), the normal is the surface's unit outward normal rotated into the camera frame
(``x`` right, ``y`` down, ``z`` forward; it always faces the camera), the label its class
(:data:`~.sampling.CLASSES`; the rug and picture relabel the floor and back wall inside their
rectangles).
"""
from __future__ import annotations

import numpy as np

from . import geometry as geo
from .camera import world_rays
from .sampling import OBJECT_TYPES
from .shading import sensor, shade, textured

FLOOR, WALL, RUG, PICTURE, BOX, SPHERE, CYLINDER = range(7)
DTYPE = np.float32   # ray casting precision (normals renormalised: unit to float32 rounding)
_PLANE_NORMALS = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], DTYPE)


def _cast(tree):
    """The scene's float arrays as :data:`DTYPE` (nested dicts)."""
    if isinstance(tree, dict):
        return {k: _cast(v) for k, v in tree.items()}
    return tree.astype(DTYPE) if tree.dtype.kind == "f" else tree


def _in_rect(u, v, rect) -> np.ndarray:
    c, h = rect["centre"][:, None], rect["half"][:, None]
    return rect["present"][:, None] & (np.abs(u - c[..., 0]) <= h[..., 0]) & (np.abs(v - c[..., 1]) <= h[..., 1])


def _hits(scene: dict, o: np.ndarray, d: np.ndarray):
    """Per surface ``t (S, B, P)``, normals (``(3,)`` for the planes, ``(B, P, 3)`` for the objects) and
    object slots ``(3, B, P)``."""
    room = scene["room"]
    ts = [geo.plane(o, d, 1, np.zeros(len(o), d.dtype)), geo.plane(o, d, 2, room["back"]),
          geo.plane(o, d, 0, room["left"]), geo.plane(o, d, 0, room["right"])]
    for i in (1, 2, 3):   # walls end at the room's height
        y = o[:, None, 1] + np.where(np.isfinite(ts[i]), ts[i], 0.0) * d[..., 1]
        ts[i] = np.where(y <= room["height"][:, None], ts[i], np.inf)
    ns = list(_PLANE_NORMALS)
    b, s, c = scene["box"], scene["sphere"], scene["cylinder"]
    slots = []
    for t, slot, n in (geo.boxes(o, d, b["centre"], b["half"], b["yaw"], b["mask"]),
                       geo.spheres(o, d, s["centre"], s["radius"], s["mask"]),
                       geo.cylinders(o, d, c["base"], c["radius"], c["height"], c["mask"])):
        ts.append(t)
        ns.append(n)
        slots.append(slot)
    return np.stack(ts), ns, np.stack(slots)


def render(scene: dict, size: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Render ``B`` scenes at ``size = (H, W)``.

    Returns ``image`` uint8 ``(B, H, W, 3)``, ``label`` int8 ``(B, H, W)`` (-1 void), ``depth``
    float32 ``(B, H, W)`` (0 void), ``normal`` float32 ``(B, H, W, 3)`` (camera frame, unit; 0 void)
    and ``object`` int8 ``(B, H, W)``: the index of the visible object among the scene's slots
    ``[box..., sphere..., cylinder...]`` (-1: none), whose ``bin`` / type the pre-training labels read.
    """
    bsz, (h, w) = len(scene["room"]["back"]), size
    o, d, rot = (a.astype(DTYPE) for a in world_rays(scene["camera"], size))
    scene = _cast(scene)
    ts, ns, slots = _hits(scene, o, d)
    surf = np.argmin(ts, 0)                                                  # (B, P)
    t = ts.min(0)
    void = ~np.isfinite(t)
    surf[void] = -1
    t = np.where(void, 0.0, t)
    n = np.zeros(d.shape, DTYPE)
    for i, ni in enumerate(ns):
        n = np.where((surf == i)[..., None], ni, n)
    p = o[:, None] + t[..., None] * d
    x, y, z = p[..., 0], p[..., 1], p[..., 2]

    label = np.full(surf.shape, -1, np.int64)
    albedo = np.zeros(d.shape, DTYPE)
    floor, back = surf == 0, surf == 1
    label[floor] = FLOOR
    label[(surf >= 1) & (surf <= 3)] = WALL
    albedo = np.where(floor[..., None], textured(scene["floor"], x, z), albedo)
    wall_u = np.where(back, x, z)
    albedo = np.where(((surf >= 1) & (surf <= 3))[..., None], textured(scene["wall"], wall_u, y), albedo)
    for rect, cls, sel, (u, v) in ((scene["rug"], RUG, floor, (x, z)), (scene["picture"], PICTURE, back, (x, y))):
        inside = sel & _in_rect(u, v, rect)
        label[inside] = cls
        albedo = np.where(inside[..., None], textured(rect, u, v), albedo)

    obj = np.full(surf.shape, -1, np.int64)
    offset = 0
    for i, name in enumerate(OBJECT_TYPES):
        sel = surf == 4 + i
        label[sel] = BOX + i
        colour = scene[name]["colour"]
        if colour.shape[1]:
            albedo = np.where(sel[..., None], np.take_along_axis(colour, slots[i][..., None], 1), albedo)
        obj[sel] = (slots[i] + offset)[sel]
        offset += colour.shape[1]

    rgb = shade(albedo, n, t, scene["light"])
    rgb[void] = scene["light"]["void"][np.nonzero(void)[0], None]
    n_cam = np.matmul(n, rot)
    n_cam *= (~void / np.maximum(np.linalg.norm(n_cam, axis=-1), 1e-12))[..., None]
    return {"image": sensor(rgb.astype(np.float32), scene["light"]["noise"], rng).reshape(bsz, h, w, 3),
            "label": label.astype(np.int8).reshape(bsz, h, w), "depth": t.astype(np.float32).reshape(bsz, h, w),
            "normal": n_cam.astype(np.float32).reshape(bsz, h, w, 3), "object": obj.astype(np.int8).reshape(bsz, h, w)}
