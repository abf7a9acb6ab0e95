"""Exact magnitude histograms of quantized task vectors, and exact streaming k-th values.

A per-tensor-quantized task vector takes at most ``2^b`` distinct values per block, so the
multiset of its magnitudes is a histogram over levels: (``|(level - z) * scale|``, count), which
is exact — the values are computed with the same float32 operations as dequantization.

:class:`StreamingQuantile` finds the exact k-th largest magnitude of a multiset seen in pieces
(dense tensors or weighted histograms) without keeping it: magnitudes are non-negative floats,
whose IEEE-754 bit patterns sort like the values, so pass 1 counts the top 16 bits (65536 bins),
picks the bin holding the k-th largest, and pass 2 counts the low 16 bits inside that bin.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..quant.kernels import code_histogram
from ..quant.qtensor import QTensor

_BINS = 1 << 16


def level_histogram(q: QTensor) -> tuple[Tensor, Tensor]:
    """``(magnitudes, counts)`` of the dequantized values of ``q`` (exact, float32)."""
    levels = 1 << q.spec.bits
    n = 1
    for d in q.shape:
        n *= d
    blocks = q.zero_point.numel()
    if blocks == 1:
        counts = code_histogram(q.packed, q.spec.bits, n)
        if counts is None:
            counts = torch.bincount(q.codes().reshape(-1)[:n].long(), minlength=levels)
        lv = torch.arange(levels, dtype=torch.float32)
        values = ((lv - q.zero_point.float()) * q.scale.float()).abs()
        return values, counts
    codes = q.codes()                                   # (blocks, width) uint8
    flat = codes.reshape(-1)[:n].long()
    width = codes.shape[1]
    block_id = torch.arange(n) // width
    counts = torch.bincount(block_id * levels + flat, minlength=blocks * levels)
    lv = torch.arange(levels, dtype=torch.float32).repeat(blocks)
    z = q.zero_point.float().repeat_interleave(levels)
    s = q.scale.float().repeat_interleave(levels)
    return ((lv - z) * s).abs(), counts


def joint_level_histogram(offset: QTensor, base: QTensor) -> tuple[Tensor, Tensor] | None:
    """``(magnitudes, counts)`` of ``offset.dequantize() + base.dequantize()`` (RTVQ's task vector),
    exact: one entry per (offset code, base code) pair, each value computed with the same float32
    operations as the decode. None unless both are per-tensor."""
    if offset.zero_point.numel() != 1 or base.zero_point.numel() != 1:
        return None
    n = 1
    for d in offset.shape:
        n *= d
    lo, lb = 1 << offset.spec.bits, 1 << base.spec.bits
    from .fused import pair_counts

    counts = pair_counts(offset, base, n)
    if counts is None:
        co = offset.codes().reshape(-1)[:n]
        cb = base.codes().reshape(-1)[:n]
        counts = torch.bincount(co.long() * lb + cb.long(), minlength=lo * lb)
    vo = (torch.arange(lo, dtype=torch.float32) - offset.zero_point.float()) * offset.scale.float()
    vb = (torch.arange(lb, dtype=torch.float32) - base.zero_point.float()) * base.scale.float()
    return (vo[:, None] + vb[None, :]).abs().reshape(-1), counts


def _bits(x: Tensor) -> Tensor:
    return x.abs().float().contiguous().view(torch.int32).long()


class StreamingQuantile:
    """Exact k-th largest |value| over a stream, in two passes (see the module docstring).

    Usage: ``add()`` every piece in pass 0, call ``next_pass()``, ``add()`` the same pieces again,
    then ``value()``. ``rank`` is 1-based from the top.
    """

    def __init__(self, rank_from_top: int):
        self.rank = int(rank_from_top)
        self.stage = 0
        self.hist = torch.zeros(_BINS, dtype=torch.float64)
        self.total = 0
        self.hi_bin = -1
        self.above = 0

    def add(self, values: Tensor, counts: Tensor | None = None) -> None:
        bits = _bits(values.reshape(-1).cpu())
        w = None if counts is None else counts.reshape(-1).cpu().double()
        if self.stage == 0:
            self._count(bits >> 16, w)
            self.total += int(values.numel() if counts is None else counts.sum())
        else:
            sel = (bits >> 16) == self.hi_bin
            self._count(bits[sel] & 0xFFFF, None if w is None else w[sel])

    def _count(self, bins: Tensor, w: Tensor | None) -> None:
        if bins.numel() < _BINS // 16:   # a few values (a level histogram): no 65536-bin temporary
            self.hist.index_add_(0, bins, w if w is not None else torch.ones(bins.numel(), dtype=torch.float64))
        else:
            self.hist += torch.bincount(bins, weights=w, minlength=_BINS).double()

    def next_pass(self) -> None:
        if not 1 <= self.rank <= self.total:
            raise ValueError(f"rank {self.rank} outside 1..{self.total}")
        from_top = torch.flip(self.hist, [0]).cumsum(0)
        idx = int(torch.searchsorted(from_top, torch.tensor(float(self.rank), dtype=torch.float64)))
        self.hi_bin = _BINS - 1 - idx
        self.above = int(from_top[idx - 1]) if idx > 0 else 0
        self.hist = torch.zeros(_BINS, dtype=torch.float64)
        self.stage = 1

    def value(self) -> float:
        need = self.rank - self.above
        from_top = torch.flip(self.hist, [0]).cumsum(0)
        idx = int(torch.searchsorted(from_top, torch.tensor(float(need), dtype=torch.float64)))
        lo = _BINS - 1 - idx
        bits = (self.hi_bin << 16) | lo
        return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()

