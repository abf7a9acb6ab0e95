"""FQ: quantize the fine-tuned weights themselves (docs/algorithms.md §3, the baseline).

The task vector is the dequantized fine-tuned weights minus the pre-trained ones,
``tau_hat = x_hat(theta_t) - theta_0``, so decoding needs theta_0. Keys the policy does not
quantize hold the exact float32 task vector (stored even when zero).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import QuantSpec
from ..kernels import sub_minmax
from ..qtensor import QTensor
from ._registry import register_scheme
from .base import Scheme


def fq_quantize(finetuned: Tensor, spec: QuantSpec) -> QTensor:
    """FQ: quantize the fine-tuned weights themselves."""
    return QTensor.quantize(finetuned, spec)


def fq_task_vector(q: QTensor, pretrained: Tensor) -> Tensor:
    """FQ's task vector: dequantized fine-tuned weights minus the pre-trained ones."""
    out = q.dequantize(torch.float32)
    return out.sub_(pretrained.float())


@register_scheme
class FQ(Scheme):
    """Affine codes of theta_t (``bits`` wide); decoding subtracts theta_0."""

    name = "fq"
    needs_pretrained = True
    skips_zero = False
    key_fields = ("bits",)

    def fixed_label(self, cfg) -> str:
        return f"FQ-INT{cfg.bits}"

    def encode_quantized(self, tau, lo, hi, info, cfg, key, *, finetuned=None, shared=None):
        if finetuned is None:
            raise ValueError("the fq scheme encodes the fine-tuned weights: pass finetuned=")
        ft, flo, fhi, _ = sub_minmax(finetuned, None, torch.empty(finetuned.shape, dtype=torch.float32))
        return QTensor.quantize(ft, cfg.spec(info.bits), value_range=(flo, fhi)).state(key)

    def decode_shared(self, cfg, info, shared, pretrained=None):
        if pretrained is None:
            raise ValueError("FQ task vectors need the pre-trained weights")
        return pretrained.float()

    def decode_quantized(self, cfg, info, parts, shared):
        q = self.qtensor(cfg, info, parts)
        return None if q is None else q.dequantize().sub_(shared.to(q.packed.device))
