"""Per-key encoding of task vectors for each scheme (the store writer's inner loop).

Pure functions of one key's tensors returning what to save; the writer owns all I/O.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..quant.config import QuantSpec
from ..quant.kernels import parallel_map, sub_minmax
from ..quant.qtensor import QTensor
from ..quant.schemes import rtvq_base
from .layout import KeyInfo, StoreConfig


_local = threading.local()


def scratch(numel: int) -> Tensor:
    """A per-thread float32 buffer of at least ``numel`` elements (reused across keys)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 16))
        _local.buf = buf
    return buf[:numel]


def task_vector_into(finetuned: Tensor, pretrained: Tensor, out: Tensor, *, label: str, key: str) -> tuple[Tensor, float, float]:
    """``out = finetuned - pretrained`` (float32) with its range; NaN / Inf is an error."""
    tau, lo, hi, finite = sub_minmax(finetuned, pretrained, out)
    if not finite:
        raise non_finite(label, key)
    return tau, lo, hi


def non_finite(label: str, key: str) -> NonFiniteError:
    """The error for a task vector with NaN or Inf."""
    return NonFiniteError(f"{label}: the task vector of key {key!r} contains NaN or Inf; check the fine-tuned checkpoint (a diverged run?)")


def encode_single(tau: Tensor, lo: float, hi: float, info: KeyInfo, cfg: StoreConfig, key: str,
                  finetuned: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors to save for one task's key under fp32 / fq / tvq (empty if the key is zero)."""
    if lo == 0.0 and hi == 0.0 and cfg.scheme != "fq":
        return {}
    if not info.quantized:
        return {key: tau}
    spec = cfg.spec(info.bits)
    if cfg.scheme == "fq":
        assert finetuned is not None
        ft, flo, fhi, _ = sub_minmax(finetuned, None, torch.empty(finetuned.shape, dtype=torch.float32))
        return QTensor.quantize(ft, spec, value_range=(flo, fhi)).state(key)
    return QTensor.quantize(tau, spec, value_range=(lo, hi)).state(key)


def encode_rtvq(taus: Sequence[Tensor], ranges: Sequence[tuple[float, float]], info: KeyInfo, cfg: StoreConfig,
                key: str) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """RTVQ of one key across tasks: (base tensors, per-task offset tensors).

    Same arithmetic as :func:`~tvq_lightning.quant.schemes.rtvq_quantize`; the offsets are
    formed in place in ``taus`` with the fused subtract / range kernel, in parallel over tasks.
    """
    if all(lo == 0.0 and hi == 0.0 for lo, hi in ranges):
        return {}, [{} for _ in taus]
    if not info.quantized:
        return {}, [{} if r == (0.0, 0.0) else {key: t} for t, r in zip(taus, ranges)]
    base, beta = rtvq_base(taus, cfg.spec(info.base_bits))
    ref = base.dequantize() if cfg.error_correction else beta
    spec = cfg.spec(info.offset_bits)

    def offset(i: int) -> dict[str, Tensor]:
        delta, lo, hi, _ = sub_minmax(taus[i], ref, taus[i])
        return QTensor.quantize(delta, spec, value_range=(lo, hi)).state(key)

    return base.state(key), parallel_map(offset, range(len(taus)))


def offset_against(tau: Tensor, base_hat: Tensor | None, spec: QuantSpec, key: str) -> dict[str, Tensor]:
    """A task added to an RTVQ store with a frozen base: offset against the stored base."""
    ref = tau if base_hat is None else tau - base_hat
    return QTensor.quantize(ref, spec).state(key)
