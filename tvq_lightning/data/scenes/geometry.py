"""Ray casting against the scenes' primitives, batched: ``B`` scenes x ``K`` slots x ``P`` rays.

Each function takes ray origins ``o (B, 3)`` and directions ``d (B, P, 3)`` (world frame, see
:mod:`.camera`) and one primitive type's slots (arrays ``(B, K, ...)`` plus a ``mask (B, K)`` of the
slots in use) and returns, per ray, the nearest hit among those slots: ``t (B, P)`` (``inf`` where
none), ``slot (B, P)`` (the hit slot; 0 where none) and the world-frame unit outward normal
``n (B, P, 3)``. Hits closer than :data:`EPS` are ignored (the camera is never inside a solid).
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6


def _nearest(t: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per ray the nearest valid slot of ``t (B, K, P)``: ``(t (B, P), slot (B, P))``."""
    t = np.where(mask[:, :, None] & (t > EPS), t, np.inf)
    return t.min(axis=1), np.argmin(t, axis=1)


def _miss(d: np.ndarray):
    """No slot of this type in the batch: ``(t = inf, slot = 0, n = 0)``."""
    return np.full(d.shape[:2], np.inf, d.dtype), np.zeros(d.shape[:2], np.int64), np.zeros_like(d)


def _select(slot: np.ndarray, get, k: int) -> np.ndarray:
    """``get(j)`` where ``slot == j``, for ``j < k`` (a few slots: cheaper than fancy indexing)."""
    out = get(0)
    for j in range(1, k):
        hit = slot == j
        out = np.where(hit.reshape(hit.shape + (1,) * (out.ndim - hit.ndim)), get(j), out)
    return out


def _gather(a: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """A per-slot attribute ``a (B, K, ...)`` at each ray's slot: ``(B, P, ...)``."""
    return _select(slot, lambda j: a[:, j, None], a.shape[1])


def _pick(a: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """A per-slot, per-ray array ``a (B, K, P, ...)`` at each ray's slot: ``(B, P, ...)``."""
    return _select(slot, lambda j: a[:, j], a.shape[1])


def plane(o: np.ndarray, d: np.ndarray, axis: int, offset: np.ndarray) -> np.ndarray:
    """``t (B, P)`` where each ray meets the plane ``x[axis] = offset (B,)`` (``inf``: behind or parallel)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset[:, None] - o[:, None, axis]) / d[..., axis]
    return np.where(t > EPS, t, np.inf)


def spheres(o, d, centre, radius, mask):
    """Spheres ``centre (B, K, 3)``, ``radius (B, K)``."""
    if not mask.shape[1]:
        return _miss(d)
    oc = o[:, None, :] - centre                                            # (B, K, 3)
    a = np.einsum("bpi,bpi->bp", d, d)[:, None]                            # (B, 1, P)
    b = np.einsum("bki,bpi->bkp", oc, d)
    c = (np.einsum("bki,bki->bk", oc, oc) - radius ** 2)[:, :, None]
    disc = b * b - a * c
    t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    t, slot = _nearest(t, mask)
    p = o[:, None] + np.where(np.isfinite(t), t, 0.0)[..., None] * d
    n = (p - _gather(centre, slot)) / _gather(radius, slot)[..., None]
    return t, slot, n


def _yaw_rotate(x: np.ndarray, y: np.ndarray, z: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the vectors ``(x, y, z)`` about ``y`` by the angle with ``cos`` / ``sin`` (broadcast)."""
    xr = cos * x + sin * z
    return np.stack([xr, np.broadcast_to(y, xr.shape), -sin * x + cos * z], -1)


def boxes(o, d, centre, half, yaw, mask):
    """Boxes ``centre (B, K, 3)``, half extents ``half (B, K, 3)``, turned by ``yaw (B, K)`` about ``y``."""
    if not mask.shape[1]:
        return _miss(d)
    cos, sin = np.cos(yaw)[:, :, None], np.sin(yaw)[:, :, None]          # (B, K, 1)
    oc = (o[:, None] - centre)[:, :, None]                                 # (B, K, 1, 3)
    dx, dy, dz = (d[:, None, :, i] for i in range(3))                      # (B, 1, P)
    local_o = (cos * oc[..., 0] - sin * oc[..., 2], oc[..., 1], sin * oc[..., 0] + cos * oc[..., 2])
    local_d = (cos * dx - sin * dz, dy, sin * dx + cos * dz)               # into the box frame
    near, far = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            inv = 1.0 / local_d[a]
            h = half[..., a][:, :, None]
            t1, t2 = (-h - local_o[a]) * inv, (h - local_o[a]) * inv
            near.append(np.minimum(t1, t2))
            far.append(np.maximum(t1, t2))
    t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
    t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
    t, slot = _nearest(np.where(t_near <= t_far, t_near, np.inf), mask)
    axis = np.argmax(np.stack([_pick(np.broadcast_to(nr, t_near.shape), slot) for nr in near], -1), -1)
    c, s = _gather(np.cos(yaw), slot), _gather(np.sin(yaw), slot)          # (B, P)
    dl = _yaw_rotate(d[..., 0], d[..., 1], d[..., 2], c, -s)               # the hit box's frame
    local = np.zeros(d.shape, d.dtype)
    np.put_along_axis(local, axis[..., None], -np.sign(np.take_along_axis(dl, axis[..., None], -1)), -1)
    return t, slot, _yaw_rotate(local[..., 0], local[..., 1], local[..., 2], c, s)


def cylinders(o, d, base, radius, height, mask):
    """Upright cylinders standing on ``base (B, K, 3)`` (``y`` = their bottom), ``radius``, ``height (B, K)``."""
    if not mask.shape[1]:
        return _miss(d)
    ocx = (o[:, None, 0] - base[..., 0])[:, :, None]                      # (B, K, 1)
    ocz = (o[:, None, 2] - base[..., 2])[:, :, None]
    dx, dy, dz = (d[:, None, :, i] for i in range(3))                      # (B, 1, P)
    r2 = radius[:, :, None] ** 2
    a = dx * dx + dz * dz
    b = ocx * dx + ocz * dz
    disc = b * b - a * (ocx * ocx + ocz * ocz - r2)
    side = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, 1e-300), np.inf)
    y = o[:, None, None, 1] + side * dy
    y0, y1 = base[..., 1][:, :, None], (base[..., 1] + height)[:, :, None]
    side = np.where((y >= y0) & (y <= y1), side, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        top = (y1 - o[:, None, None, 1]) / dy
    tx, tz = ocx + top * dx, ocz + top * dz
    top = np.where((dy < 0) & (tx * tx + tz * tz <= r2), top, np.inf)
    t, slot = _nearest(np.minimum(side, top), mask)
    is_top = _pick(top, slot) <= _pick(side, slot)
    p = o[:, None] + np.where(np.isfinite(t), t, 0.0)[..., None] * d
    c = _gather(base, slot)
    radial = np.stack([p[..., 0] - c[..., 0], np.zeros_like(t), p[..., 2] - c[..., 2]], -1) / _gather(radius, slot)[..., None]
    n = np.where(is_top[..., None], np.array([0.0, 1.0, 0.0], d.dtype), radial)
    return t, slot, n
