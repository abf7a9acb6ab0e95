"""TVQ: quantize the task vector ``tau_t = theta_t - theta_0`` (docs/algorithms.md §3).

Each quantized key is stored as affine codes of ``bits`` bits (min-max, per tensor / channel /
group) and decoded as ``(q - z) * scale``. Per-tensor TVQ of float32 weights takes the fused
numba path of ``store/fused.py``; its magnitudes form an exact level histogram (TIES).
"""
from __future__ import annotations

from torch import Tensor

from ..config import QuantSpec
from ..qtensor import QTensor
from ._registry import register_scheme
from .base import Scheme


def tvq_quantize(tau: Tensor, spec: QuantSpec) -> QTensor:
    """TVQ: quantize a task vector."""
    return QTensor.quantize(tau, spec)


@register_scheme
class TVQ(Scheme):
    """Affine codes of tau (``bits`` wide; per key from a bit allocation)."""

    name = "tvq"
    key_fields = ("bits",)
    allocation_fields = ("bits",)

    def fixed_label(self, cfg) -> str:
        return f"TVQ-INT{cfg.bits}"

    def fused_spec(self, cfg, info):
        return cfg.spec(info.bits) if cfg.granularity == "tensor" else None

    def encode_quantized(self, tau, lo, hi, info, cfg, key, *, finetuned=None, shared=None):
        return QTensor.quantize(tau, cfg.spec(info.bits), value_range=(lo, hi)).state(key)

    def levels(self, cfg, info, parts, shared=None):
        from ...merging.histogram import level_histogram

        q = self.qtensor(cfg, info, parts)
        return None if q is None else level_histogram(q)

    def error_table(self, sample):
        from ..error_tables import affine_errors

        return affine_errors(sample)
