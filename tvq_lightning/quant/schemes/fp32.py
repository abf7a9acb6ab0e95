"""FP32: the exact task vectors ``tau_t = theta_t - theta_0``, nothing quantized (docs/algorithms.md §3)."""
from __future__ import annotations

from ._registry import register_scheme
from .base import Scheme


@register_scheme
class FP32(Scheme):
    """Every key is stored as its float32 task vector; a zero vector stores nothing."""

    name = "fp32"
    quantizes = False

    def fixed_label(self, cfg) -> str:
        return "FP32"
