"""BitDelta: one sign bit per entry and one full-precision scale (docs/algorithms.md §3).

``tau_hat = alpha * sign(tau)`` with ``alpha = mean |tau|`` over the tensor: the initialisation
of BitDelta (Liu et al., 2024), which minimises ``||tau - alpha * sign(tau)||^2`` over ``alpha``
for a fixed sign pattern. With ``granularity="channel"`` each output row (dim 0) gets its own
``alpha_r = mean |tau_r|``. ``sign(0)`` is taken as ``+1``: an entry that is exactly zero is
stored as code 1 and decodes to ``+alpha``. The mean is accumulated in float64 and stored as
float32.

On disk a quantized key ``k`` holds ``k#q`` (codes packed 1 bit per entry, ``ceil(n / 8)`` bytes,
code 1 for ``+alpha``, 0 for ``-alpha``) and ``k#s`` (float32 alphas, one per block); keys the
policy does not quantize hold their float32 task vector, and a zero task vector stores nothing.
``StoreConfig.bits`` is not used (the codes are always 1 bit wide). Every decoded magnitude is
its block's alpha, so TIES' thresholds get an exact histogram. Bit allocation has a single
candidate (1 bit): a budget of at least 1 bit per parameter gives every key 1 bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...errors import QuantConfigError
from ..packing import pack_codes, packed_nbytes, unpack_codes
from ..qtensor import CODES, SCALE
from ._registry import register_scheme
from .base import Scheme

GRANULARITIES = ("tensor", "channel")


def _blocks(shape: tuple[int, ...], granularity: str) -> int:
    return shape[0] if granularity == "channel" and shape else 1


def bitdelta_quantize(tau: Tensor, granularity: str = "tensor") -> tuple[Tensor, Tensor]:
    """``(packed sign codes, alphas)`` of ``tau``: code ``1`` where ``tau >= 0``, alpha = mean |tau|
    per block (the whole tensor, or each row with ``granularity="channel"``)."""
    rows = tau.detach().float().reshape(_blocks(tuple(tau.shape), granularity), -1)
    alpha = rows.abs().sum(1, dtype=torch.float64).div_(max(rows.shape[1], 1)).float()
    return pack_codes(rows.ge(0).to(torch.uint8), 1), alpha


def bitdelta_dequantize(packed: Tensor, alpha: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """``alpha * sign``: ``+alpha`` for code 1, ``-alpha`` for code 0, on ``packed``'s device."""
    n = 1
    for d in shape:
        n *= int(d)
    codes = unpack_codes(packed, 1, n).view(alpha.numel(), -1)
    out = codes.to(torch.float32).mul_(2.0).sub_(1.0).mul_(alpha.to(torch.float32).view(-1, 1))
    return out.view(shape).to(dtype)


@register_scheme
class BitDelta(Scheme):
    """1-bit signs of tau with one float32 scale per tensor (or per row)."""

    name = "bitdelta"
    key_fields = ("bits",)
    allocation_fields = ("bits",)

    def widths(self, cfg) -> tuple[int, ...]:
        return (1,)

    def validate(self, cfg) -> None:
        if cfg.granularity not in GRANULARITIES:
            raise QuantConfigError(f"bitdelta has one scale per tensor or per row: granularity {cfg.granularity!r} "
                                   f"is not supported, choose {' or '.join(GRANULARITIES)}")
        if cfg.symmetric:
            raise QuantConfigError("bitdelta is symmetric by construction (+/- alpha); drop symmetric / --symmetric")
        super().validate(cfg)

    def fixed_label(self, cfg) -> str:
        return "BitDelta" + ("-row" if cfg.granularity == "channel" else "")

    def key_widths(self, cfg, key, allocation=None) -> dict[str, int]:
        return {"bits": 1}

    def blocks(self, cfg, info) -> int:
        return _blocks(info.shape, cfg.granularity)

    def stored_parts(self, cfg, info):
        blocks = self.blocks(cfg, info)
        return {CODES: ("U8", 1), SCALE: ("F32", 1)}, packed_nbytes(info.numel, 1) + 4 * blocks + 64

    def encode_quantized(self, tau, lo, hi, info, cfg, key, *, finetuned=None, shared=None):
        packed, alpha = bitdelta_quantize(tau, cfg.granularity)
        return {key + CODES: packed, key + SCALE: alpha}

    def _checked(self, cfg, info, parts) -> tuple[Tensor, Tensor] | None:
        if CODES not in parts:
            return None
        packed, alpha = parts[CODES], parts[SCALE]
        if packed.numel() != packed_nbytes(info.numel, 1) or alpha.numel() != self.blocks(cfg, info):
            raise ValueError(f"bitdelta parts hold {packed.numel()} code bytes and {alpha.numel()} scales, expected "
                             f"{packed_nbytes(info.numel, 1)} and {self.blocks(cfg, info)}")
        return packed, alpha

    def decode_quantized(self, cfg, info, parts, shared):
        found = self._checked(cfg, info, parts)
        return None if found is None else bitdelta_dequantize(*found, info.shape)

    def levels(self, cfg, info, parts, shared=None):
        found = self._checked(cfg, info, parts)
        if found is None:
            return None
        alpha = found[1].detach().to("cpu", torch.float32).reshape(-1)
        return alpha.abs(), torch.full((alpha.numel(),), info.numel // alpha.numel(), dtype=torch.long)

    def allocation_candidates(self, bits, num_tasks):
        return ([(1,)], [1], 1) if 1 in bits else ([], [], 1)

    def error_table(self, sample):
        """Exact error on the full tensors: ``sum_t ||tau_t - alpha_t sign(tau_t)||^2`` at 1 bit."""
        err = torch.full((8,), float("inf"), dtype=torch.float64)
        total = 0.0
        for x in sample.xs:
            tau = x.view(sample.shape)
            total += float((tau - bitdelta_dequantize(*bitdelta_quantize(tau, sample.spec.granularity), sample.shape))
                           .double().pow(2).sum())
        err[0] = total
        return err
