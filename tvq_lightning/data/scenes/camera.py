"""Pinhole cameras and their rays, batched over scenes.

World frame: ``y`` up, the floor is ``y = 0``, the room's back wall lies towards ``+z``. Camera
frame (the frame of the depth and normal targets): ``x`` right, ``y`` down, ``z`` forward, right-handed
(OpenCV's). A camera is its position, its yaw (about the world's ``y``), its tilt (downwards, radians)
and its vertical field of view.

Rays are *not* normalised: a pixel's world direction is ``R @ ((u - cx) / f, (v - cy) / f, 1)``, so
the ray parameter ``t`` of a hit point ``o + t d`` is exactly its camera-frame depth ``z``.
"""
from __future__ import annotations

import numpy as np


def rotation(yaw: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """Camera-to-world rotations ``(B, 3, 3)``, columns = the camera's right, down, forward axes."""
    fwd = np.stack([np.sin(yaw) * np.cos(tilt), -np.sin(tilt), np.cos(yaw) * np.cos(tilt)], -1)
    right = np.cross(fwd, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd], -1)


def focal_pixels(fov: np.ndarray, height: int) -> np.ndarray:
    """Focal length in pixels of a vertical field of view ``fov`` (radians) over ``height`` rows."""
    return 0.5 * height / np.tan(0.5 * np.asarray(fov, np.float64))


def camera_rays(fov: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Camera-frame ray directions ``(B, H * W, 3)`` through the pixel centres, ``z`` = 1."""
    h, w = size
    f = focal_pixels(fov, h)[:, None]
    v, u = np.meshgrid(np.arange(h) + 0.5 - 0.5 * h, np.arange(w) + 0.5 - 0.5 * w, indexing="ij")
    x, y = u.reshape(1, -1) / f, v.reshape(1, -1) / f
    return np.stack([x, y, np.ones_like(x)], -1)


def world_rays(cam: dict[str, np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(origins (B, 3), directions (B, P, 3), R (B, 3, 3))`` of cameras ``cam`` (``pos``, ``yaw``,
    ``tilt``, ``fov``) over an image of ``size = (H, W)``; ``P = H * W``, row-major."""
    rot = rotation(cam["yaw"], cam["tilt"])
    c = camera_rays(cam["fov"], size)
    dirs = c[..., :1] * rot[:, None, :, 0] + c[..., 1:2] * rot[:, None, :, 1] + rot[:, None, :, 2]
    return np.asarray(cam["pos"], np.float64), dirs, rot
