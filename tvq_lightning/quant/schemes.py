"""FQ, TVQ and RTVQ on one key's tensors (pure functions, no I/O).

- FQ quantizes the fine-tuned weights ``theta_t``; its task vector is ``x_hat(theta_t) - theta_0``.
- TVQ quantizes the task vector ``tau_t = theta_t - theta_0``.
- RTVQ quantizes a shared base ``beta = mean_t tau_t`` with ``b_base`` bits and per-task offsets
  with ``b_off`` bits. With error correction (default) the offsets are taken against the
  quantized base, ``delta_t = tau_t - x_hat(beta)``, so the reconstruction
  ``x_hat(beta) + x_hat(delta_t)`` carries only the offset's quantization error. Without it
  (the official code's default) ``delta_t = tau_t - beta``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import QuantSpec
from .qtensor import QTensor


def tvq_quantize(tau: Tensor, spec: QuantSpec) -> QTensor:
    """TVQ: quantize a task vector."""
    return QTensor.quantize(tau, spec)


def fq_quantize(finetuned: Tensor, spec: QuantSpec) -> QTensor:
    """FQ: quantize the fine-tuned weights themselves."""
    return QTensor.quantize(finetuned, spec)


def fq_task_vector(q: QTensor, pretrained: Tensor) -> Tensor:
    """FQ's task vector: dequantized fine-tuned weights minus the pre-trained ones."""
    out = q.dequantize(torch.float32)
    return out.sub_(pretrained.float())


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


def relative_l2_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (0 when both are zero)."""
    num = torch.linalg.vector_norm((approx.float() - exact.float()).reshape(-1)).item()
    den = torch.linalg.vector_norm(exact.float().reshape(-1)).item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
