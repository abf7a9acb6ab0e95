"""Surface appearance: procedural textures, Lambertian shading with ambient light, sensor noise.

Textures are functions of a surface's own 2-D coordinates in metres (the floor's ``x, z``; a wall's
horizontal coordinate and height), so they are perspective-correct. Shading is
``albedo * gain * (ambient + (1 - ambient) max(0, n . l)) * exp(-falloff * depth)`` with one
directional light ``l`` per scene, then Gaussian pixel noise.
"""
from __future__ import annotations

import numpy as np


def pattern(u: np.ndarray, v: np.ndarray, kind: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Mixing weight in {0, 1} per ray ``(B, P)``: kind 0 plain, 1 checker, 2 / 3 stripes along ``u`` / ``v``."""
    s = scale[:, None]
    iu, iv = np.floor(u / s).astype(np.int64), np.floor(v / s).astype(np.int64)
    k = kind[:, None]
    m = np.where(k == 1, iu + iv, np.where(k == 2, iu, iv)) & 1
    return np.where(k == 0, 0, m).astype(u.dtype)


def textured(tex: dict[str, np.ndarray], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Albedo ``(B, P, 3)`` of texture ``tex`` (``kind``, ``scale``, ``colours (B, 2, 3)``) at ``(u, v)``."""
    m = pattern(u, v, tex["kind"], tex["scale"])[..., None]
    c = tex["colours"]
    return c[:, None, 0] * (1.0 - m) + c[:, None, 1] * m


def shade(albedo: np.ndarray, normal: np.ndarray, depth: np.ndarray, light: dict[str, np.ndarray]) -> np.ndarray:
    """Lambertian colour ``(B, P, 3)`` of world-frame unit normals under each scene's light."""
    lam = np.maximum(np.einsum("bpi,bi->bp", normal, light["dir"]), 0.0)
    amb = light["ambient"][:, None]
    k = light["gain"][:, None] * (amb + (1.0 - amb) * lam) * np.exp(-light["falloff"][:, None] * depth)
    return albedo * k[..., None]


def sensor(rgb: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add per-scene Gaussian noise (std ``noise (B,)``) and quantize to ``uint8``."""
    out = rgb + noise[:, None, None] * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
