"""RTVQ: a shared base plus per-task residual offsets (docs/algorithms.md §3).

The base ``beta = mean_t tau_t`` (summed in task order, then divided) is quantized once with
``base_bits``; each task stores an offset quantized with ``offset_bits``. With error correction
(default) the offsets are taken against the quantized base, ``delta_t = tau_t - x_hat(beta)``, so
the reconstruction ``x_hat(beta) + x_hat(delta_t)`` carries only the offset's quantization error;
without it (the official code's default) ``delta_t = tau_t - beta``. The base lives in the
store's shared file; tasks added later take offsets against the stored (frozen) base, or the base
is recomputed over all tasks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import QuantSpec
from ..kernels import parallel_map, sub_minmax
from ..qtensor import QTensor
from ._registry import register_scheme
from .base import Scheme


def rtvq_base(taus: Sequence[Tensor], spec: QuantSpec) -> tuple[QTensor, Tensor]:
    """The quantized base of RTVQ and its fp32 mean ``beta`` (summed in task order, then divided)."""
    beta = taus[0].float().clone()
    for t in taus[1:]:
        beta.add_(t.float())
    if len(taus) > 1:
        beta.div_(len(taus))
    return QTensor.quantize(beta, spec), beta


def rtvq_offset(tau: Tensor, base_hat: Tensor, beta: Tensor | None, spec: QuantSpec,
                error_correction: bool = True) -> QTensor:
    """One task's offset against the base: ``tau - x_hat(beta)`` (error correction) or ``tau - beta``."""
    if error_correction:
        ref = base_hat
    else:
        if beta is None:
            raise ValueError("rtvq without error correction needs the full-precision base beta")
        ref = beta
    return QTensor.quantize(tau.float() - ref, spec)


@dataclass(frozen=True)
class RTVQKey:
    """RTVQ of one key: the quantized base and one quantized offset per task."""

    base: QTensor
    offsets: tuple[QTensor, ...]

    def task_vector(self, i: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return rtvq_reconstruct(self.base, self.offsets[i], dtype)


def rtvq_quantize(taus: Sequence[Tensor], base_spec: QuantSpec, offset_spec: QuantSpec,
                  error_correction: bool = True) -> RTVQKey:
    """RTVQ of one key across all tasks."""
    base, beta = rtvq_base(taus, base_spec)
    base_hat = base.dequantize()
    offsets = tuple(rtvq_offset(t, base_hat, beta, offset_spec, error_correction) for t in taus)
    return RTVQKey(base, offsets)


def rtvq_reconstruct(base: QTensor | Tensor, offset: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x_hat(beta) + x_hat(delta_t)``; ``base`` may be given already dequantized."""
    base_hat = base.dequantize(dtype) if isinstance(base, QTensor) else base.to(dtype)
    return offset.dequantize(dtype).add_(base_hat)


def effective_bits_rtvq(base_bits: float, offset_bits: float, num_tasks: int) -> float:
    """Bits per parameter per task of RTVQ: ``b_off + b_base / T``."""
    return offset_bits + base_bits / num_tasks


@register_scheme
class RTVQ(Scheme):
    """Shared quantized base (``base_bits``) + per-task quantized offsets (``offset_bits``)."""

    name = "rtvq"
    shared_file = True
    key_fields = ("base_bits", "offset_bits")
    allocation_fields = ("base_bits", "offset_bits")

    def label(self, cfg) -> str:
        return super().label(cfg) + ("" if cfg.error_correction else "-noEC")

    def fixed_label(self, cfg) -> str:
        return f"RTVQ-B{cfg.base_bits}O{cfg.offset_bits}"

    def detail(self, cfg) -> str:
        return f"error correction: {cfg.error_correction}"

    def task_bits(self, info) -> int:
        return info.offset_bits

    # -- encoding: all tasks at once, or against a frozen base ----------------------------------
    def encode_joint(self, taus, ranges, info, cfg, key):
        """Same arithmetic as :func:`rtvq_quantize`; offsets formed in place in ``taus`` with the
        fused subtract / range kernel, in parallel over tasks."""
        if all(lo == 0.0 and hi == 0.0 for lo, hi in ranges):
            return {}, [{} for _ in taus]
        base, beta = rtvq_base(taus, cfg.spec(info.base_bits))
        ref = base.dequantize() if cfg.error_correction else beta
        spec = cfg.spec(info.offset_bits)

        def offset(i: int) -> dict[str, Tensor]:
            delta, lo, hi, _ = sub_minmax(taus[i], ref, taus[i])
            return QTensor.quantize(delta, spec, value_range=(lo, hi)).state(key)

        return base.state(key), parallel_map(offset, range(len(taus)))

    def encode_task(self, tau, lo, hi, info, cfg, key, *, finetuned=None, shared=None):
        """A task added with a frozen base: its offset against the stored base ``shared``."""
        if not info.quantized or (lo == 0.0 and hi == 0.0 and shared is None):
            return super().encode_task(tau, lo, hi, info, cfg, key)
        ref = tau if shared is None else tau - shared
        return QTensor.quantize(ref, cfg.spec(info.offset_bits)).state(key)

    # -- decoding -------------------------------------------------------------------------------
    def decode_shared(self, cfg, info, shared, pretrained=None):
        base = None if shared is None else self.qtensor(cfg, info, shared, info.base_bits)
        return None if base is None else base.dequantize()

    def levels(self, cfg, info, parts, shared=None):
        """Exact histogram of ``x_hat(delta_t) + x_hat(beta)``: counts of (offset code, base code) pairs."""
        from ...merging.histogram import joint_level_histogram, level_histogram

        off = self.qtensor(cfg, info, parts)
        base = None if shared is None else self.qtensor(cfg, info, shared, info.base_bits)
        if off is None:
            return None
        return level_histogram(off) if base is None else joint_level_histogram(off, base)

    def decode_quantized(self, cfg, info, parts, shared):
        tau = super().decode_quantized(cfg, info, parts, shared)
        return tau.add_(shared) if tau is not None and shared is not None else tau

    # -- cost and bit allocation ------------------------------------------------------------------
    def bits_per_param(self, info, num_tasks: int) -> float:
        return effective_bits_rtvq(info.base_bits, info.offset_bits, num_tasks)

    def width_label(self, info) -> str:
        return f"B{info.base_bits}O{info.offset_bits}"

    def allocation_candidates(self, bits, num_tasks):
        T = num_tasks
        settings = sorted(((bb, bo) for bb in bits for bo in bits), key=lambda p: (T * p[1] + p[0], p[1]))
        return settings, [T * bo + bb for bb, bo in settings], T

    def error_table(self, sample):
        from ..error_tables import base_offset_errors

        return base_offset_errors(sample)

    def describe_widths(self, span, per_tensor: bool) -> str:
        if per_tensor:
            return f"base {span['base_bits']}, offsets {span['offset_bits']} bits"
        return f"B{span['base_bits']}O{span['offset_bits']}"
