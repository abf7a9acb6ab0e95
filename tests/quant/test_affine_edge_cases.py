"""The quantizer on edge cases: constant tensors and blocks (exact), subnormal and extreme ranges,
ranges that exclude zero (zero-point outside the code range)."""
from __future__ import annotations


import pytest
import torch

from tvq_lightning.quant.affine import (
    quantize_affine,
)
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.qtensor import QTensor

from _affine_helpers import BITS, BITS_SYM, PATHS, SPECS, check_bound, levels, rand_tensor, specs_for  # noqa: E402

# ------------------------------------------------------------------------------ constant tensors

CONSTANTS = [0.0, -0.0, 1.0, 3.7, -2.5, 1e-30, -1e-30, 1e30, -1e30, 1.17549435e-38, 3e38, -3e38]


@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_constant_tensor_is_exact(bits, sym):
    consts = torch.tensor(CONSTANTS, dtype=torch.float32)
    for spec in specs_for(bits, sym):
        for path in PATHS:
            # a whole tensor of one value, for every value and for 2-D, 1-D and 0-D shapes
            whole = spec.granularity == "tensor"
            for c in (CONSTANTS if whole else (0.0, -2.5, 1e30)):
                for shape in (((6, 9), (13,), ()) if whole else ((6, 9), ())):
                    x = torch.full(shape, c, dtype=torch.float32)
                    xh = path(x, spec)
                    assert xh.shape == x.shape
                    assert torch.equal(xh, x), (spec, c, shape, xh.reshape(-1)[:3])
            # every block constant, each block a different value (the last group is partial)
            if spec.granularity == "channel":
                x = consts[:, None].expand(-1, 9).contiguous()
            elif spec.granularity == "group":
                x = consts.repeat_interleave(spec.group_size)[: -(spec.group_size // 2) or None].contiguous()
            else:
                continue
            assert torch.equal(path(x, spec), x), spec
            codes, _, _ = quantize_affine(x, spec)
            assert int(codes.max()) <= levels(spec.bits)


@pytest.mark.parametrize("c", [1e-40, -1e-40, 1e-45])
def test_constant_subnormal_tensor_is_exact(c):
    """1 / c overflows float32 for a subnormal c: the constant case must not rely on it."""
    x = torch.full((4, 4), c, dtype=torch.float32)
    for spec in SPECS:
        for path in PATHS:
            assert torch.equal(path(x, spec), x), spec


@pytest.mark.parametrize("vals", [[0.0, 3e-38], [-1e-39, 0.0, 2e-39], [-1e-45, 0.0, 1e-45]])
def test_tiny_range_zero_exact(vals):
    x = torch.tensor(vals, dtype=torch.float32)
    for spec in SPECS:
        for path in PATHS:
            xh = path(x, spec)
            assert xh[vals.index(0.0)] == 0, (spec, xh.tolist())
            assert torch.isfinite(xh).all()


def test_huge_range_stays_finite():
    x = torch.tensor([-3e38, 0.0, 3e38], dtype=torch.float32)
    for spec in SPECS:
        for path in PATHS:
            assert torch.isfinite(path(x, spec)).all(), spec


@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_constant_rows_per_channel(bits, sym):
    for spec in specs_for(bits, sym, 'channel'):
        for path in PATHS:
            x = rand_tensor((7, 10))
            x[2] = 0.7
            x[4] = 0.0
            x[5] = -1e-30
            x[6] = 5e20
            xh = path(x, spec)
            for r in (2, 4, 5, 6):
                assert torch.equal(xh[r], x[r]), r
            check_bound(x, xh, spec)
            # one row per block: 1-D channel quantization is exact everywhere (each value is its own row)
            v = rand_tensor((50,))
            assert torch.equal(path(v, spec), v)


@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_constant_group_is_exact(bits, sym):
    for spec in specs_for(bits, sym, 'group'):
        for path in PATHS:
            g = spec.group_size
            x = rand_tensor((3 * g + 2,))
            x[g:2 * g] = -0.3  # the whole second group is constant
            xh = path(x, spec)
            assert torch.equal(xh[g:2 * g], x[g:2 * g])
            check_bound(x, xh, spec)


# ------------------------------------------------------------------ ranges that exclude zero

ONE_SIGNED = ((1.0, 2.0), (100.0, 101.0), (-3.0, -1.0), (-0.02, -0.01))


def one_signed(lo: float, hi: float, n: int) -> torch.Tensor:
    return (torch.rand(n) * (hi - lo) + lo).float()


@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_one_signed_tensors(bits, sym):
    for spec in specs_for(bits, sym):
        if spec.granularity == "tensor":
            xs = [one_signed(lo, hi, 23 * 17).view(23, 17) for lo, hi in ONE_SIGNED]
        elif spec.granularity == "channel":  # every row one-signed, a different range per row
            xs = [torch.stack([one_signed(lo, hi, 17) for lo, hi in ONE_SIGNED * 3])]
        else:  # every group one-signed, a different range per group
            xs = [torch.cat([one_signed(lo, hi, spec.group_size) for lo, hi in ONE_SIGNED * 2])]
        for x in xs:
            for path in PATHS:
                check_bound(x, path(x, spec), spec)


@pytest.mark.parametrize("bits", BITS)
def test_zero_point_outside_code_range(bits):
    L = levels(bits)
    pos = torch.rand(300) + 1.0
    neg = -torch.rand(300) - 1.0
    _, zp, _ = quantize_affine(pos, QuantSpec(bits))
    _, zn, _ = quantize_affine(neg, QuantSpec(bits))
    assert float(zp) < 0
    assert float(zn) > L
    qp, qn = QTensor.quantize(pos, QuantSpec(bits)), QTensor.quantize(neg, QuantSpec(bits))
    assert int(qp.zero_point) == int(zp) and int(qn.zero_point) == int(zn)
    check_bound(pos, qp.dequantize(), QuantSpec(bits))
    check_bound(neg, qn.dequantize(), QuantSpec(bits))
