"""Shared parameters and checks of the quantizer tests (test_affine*.py)."""
from __future__ import annotations

import math

import pytest
import torch

from tvq_lightning.quant.affine import (
    fake_quantize,
)
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.qtensor import QTensor

BITS = list(range(1, 9))
# (granularity, group_size): odd group sizes, a group of one, and groups larger than the tensor
GRANS = [("tensor", 128), ("channel", 128), ("group", 1), ("group", 3), ("group", 7), ("group", 33),
         ("group", 127), ("group", 4099)]


def all_specs():
    out = []
    for b in BITS:
        for gran, g in GRANS:
            for sym in (False, True):
                if sym and b < 2:
                    continue
                out.append(QuantSpec(b, gran, g, sym))
    return out


SPECS = all_specs()
# the tests iterate over granularities (and both implementations) inside one test per
# (bits, symmetric) pair: ~1/16 of the test ids, the same coverage
BITS_SYM = [pytest.param(b, sym, id=f"b{b}-{'sym' if sym else 'asym'}")
            for b in BITS for sym in (False, True) if not (sym and b < 2)]


def specs_for(bits: int, sym: bool, granularity: str | None = None) -> list[QuantSpec]:
    return [s for s in SPECS if s.bits == bits and s.symmetric == sym
            and (granularity is None or s.granularity == granularity)]


def spec_id(spec: QuantSpec) -> str:
    g = f"{spec.granularity}{spec.group_size if spec.granularity == 'group' else ''}"
    return f"b{spec.bits}-{g}-{'sym' if spec.symmetric else 'asym'}"


def levels(bits: int) -> int:
    return (1 << bits) - 1


def fq_torch(x, spec):
    return fake_quantize(x, spec)


def fq_qtensor(x, spec):
    return QTensor.quantize(x, spec).dequantize()


PATHS = (fq_torch, fq_qtensor)


def block_index(shape: tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """For each flat element, the index of the block that shares its (scale, zero-point)."""
    n = math.prod(shape)
    idx = torch.arange(n)
    if spec.granularity == "tensor":
        return torch.zeros(n, dtype=torch.long)
    if spec.granularity == "channel":
        rows = shape[0] if len(shape) > 0 else 1
        return idx // max(1, n // rows) if n else idx
    return idx // spec.group_size


def check_bound(x: torch.Tensor, xh: torch.Tensor, spec: QuantSpec) -> None:
    """|x - x_hat| <= half a step of each block (+ a float32 rounding epsilon)."""
    assert xh.shape == x.shape
    assert torch.isfinite(xh).all()
    xf, hf = x.reshape(-1).double(), xh.reshape(-1).double()
    if xf.numel() == 0:
        return
    blk = block_index(tuple(x.shape), spec)
    nb = int(blk.max()) + 1
    lo = torch.full((nb,), math.inf, dtype=torch.float64).scatter_reduce(0, blk, xf, "amin")
    hi = torch.full((nb,), -math.inf, dtype=torch.float64).scatter_reduce(0, blk, xf, "amax")
    amax = torch.maximum(lo.abs(), hi.abs())
    if spec.symmetric:
        half_step = torch.where(hi > lo, amax / (2 * ((1 << (spec.bits - 1)) - 1)), torch.zeros_like(amax))
    else:
        half_step = (hi - lo) / (2 * levels(spec.bits))
    eps = 2.0 ** -20 * amax + 1e-38
    err = (xf - hf).abs()
    bad = err > (half_step + eps)[blk]
    assert not bad.any(), (spec, int(blk[bad][0]), float(lo[blk[bad][0]]), float(hi[blk[bad][0]]),
                           float(err[bad].max()), float(half_step[blk[bad][0]]))


def rand_tensor(shape, scale=1.0, offset=0.0):
    return (torch.randn(shape) * scale + offset).float()
