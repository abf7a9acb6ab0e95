"""The numba kernels are bit-identical to the torch reference path (``TVQ_DISABLE_NUMBA=1``)."""
from __future__ import annotations

import math

import pytest
import torch

from tvq_lightning.quant import kernels
from tvq_lightning.quant.affine import affine_params, fake_quantize, quantize_affine
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.packing import pack_codes, unpack_codes
from tvq_lightning.quant.qtensor import QTensor

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")

BITS = list(range(1, 9))
# group sizes that are not multiples of 8 (and one larger than every tensor below)
GRANS = [("tensor", 128), ("channel", 128), ("group", 1), ("group", 3), ("group", 13), ("group", 100),
         ("group", 4099)]
# numel not a multiple of 8 (1961, 61; 437 below), a 3-D multiple of 8 (64), 0-D
SHAPES = [(37, 53), (61,), (2, 4, 8), ()]
BITS_SYM = [pytest.param(b, sym, id=f"b{b}-{'sym' if sym else 'asym'}")
            for b in BITS for sym in (False, True) if not (sym and b < 2)]


@pytest.fixture
def torch_path(monkeypatch):
    """A context that runs its body with the numba kernels disabled."""
    class _Ctx:
        def __enter__(self):
            monkeypatch.setenv("TVQ_DISABLE_NUMBA", "1")
            assert not kernels.numba_enabled()

        def __exit__(self, *exc):
            monkeypatch.delenv("TVQ_DISABLE_NUMBA")
            assert kernels.numba_enabled()

    monkeypatch.delenv("TVQ_DISABLE_NUMBA", raising=False)
    return _Ctx()


def assert_same(x: torch.Tensor, spec: QuantSpec, torch_path) -> None:
    assert kernels.numba_enabled()
    qn = QTensor.quantize(x, spec)
    dn = qn.dequantize()
    with torch_path:
        qt = QTensor.quantize(x, spec)
        dt = qt.dequantize()
        dt_of_qn = qn.dequantize()  # the torch unpack/dequantize of the numba bytes
    dn_of_qt = qt.dequantize()      # the numba unpack/dequantize of the torch bytes
    assert qn.packed.dtype == qt.packed.dtype == torch.uint8
    assert torch.equal(qn.packed, qt.packed), (spec, tuple(x.shape))
    assert torch.equal(qn.zero_point, qt.zero_point)
    assert torch.equal(qn.scale, qt.scale)
    for d in (dt, dt_of_qn, dn_of_qt):
        assert d.shape == dn.shape == x.shape
        # bit-identical, including the sign of zeros
        assert torch.equal(d.view(torch.int32), dn.view(torch.int32)), (spec, tuple(x.shape))
    # and both equal the pure reference functions of affine.py / packing.py
    codes, z, scale = quantize_affine(x, spec)
    assert torch.equal(pack_codes(codes, spec.bits), qn.packed)
    assert torch.equal(fake_quantize(x.float(), spec).view(torch.int32), dn.view(torch.int32))


def test_kernels_are_active_and_env_disables_them(monkeypatch):
    monkeypatch.delenv("TVQ_DISABLE_NUMBA", raising=False)
    assert kernels.numba_enabled()
    x = torch.randn(100)
    s, z = torch.tensor([3.0]), torch.tensor([7.0])
    out = torch.empty(50, dtype=torch.uint8)
    assert kernels.quantize_pack(x, s, z, 4, out)
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("TVQ_DISABLE_NUMBA", value)
        assert not kernels.numba_enabled()
        assert not kernels.quantize_pack(x, s, z, 4, out)
        assert not kernels.unpack_dequantize(out, z, s, 4, 100, torch.empty(100))
    monkeypatch.setenv("TVQ_DISABLE_NUMBA", "0")
    assert kernels.numba_enabled()


@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_qtensor_bit_identical(bits, sym, torch_path):
    for gran, g in GRANS:
        spec = QuantSpec(bits, gran, g, sym)
        for shape in SHAPES:
            x = torch.randn(shape) * 0.05
            assert_same(x, spec, torch_path)
        # values on rounding ties, exact zeros, a constant row and an all-positive row
        x = torch.randint(-40, 41, (23, 19)).float() / 4
        x[3] = -0.25
        x[5] = torch.rand(19) + 3.0
        assert_same(x, spec, torch_path)


@pytest.mark.parametrize("bits", BITS)
def test_qtensor_bit_identical_large(bits, torch_path):
    # larger than affine.CHUNK (2**18) and than one parallel work item of the kernels
    x = torch.randn(301, 1003) * 1e-3
    for spec in (QuantSpec(bits), QuantSpec(bits, "channel"), QuantSpec(bits, "group", group_size=333)):
        assert_same(x, spec, torch_path)


@pytest.mark.parametrize("bits", BITS)
def test_non_contiguous_and_other_dtypes(bits, torch_path):
    base = torch.randn(24, 31)
    for x in (base.t(), base[:, ::2], base.double(), base.half(), base.bfloat16()):
        for spec in (QuantSpec(bits), QuantSpec(bits, "group", group_size=7)):
            assert_same(x, spec, torch_path)


@pytest.mark.parametrize("bits", BITS)
def test_value_range_shortcut(bits):
    a, b = torch.randn(40, 41), torch.randn(40, 41)
    diff, lo, hi, finite = kernels.sub_minmax(a, b)
    assert finite
    q1 = QTensor.quantize(diff, QuantSpec(bits), value_range=(lo, hi))
    q2 = QTensor.quantize(a - b, QuantSpec(bits))
    assert torch.equal(q1.packed, q2.packed)
    assert torch.equal(q1.dequantize(), q2.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_kernel_pack_unpack_match_reference(bits, monkeypatch):
    """quantize_pack/unpack_dequantize directly, for lengths around multiples of 8."""
    monkeypatch.delenv("TVQ_DISABLE_NUMBA", raising=False)
    for n in (1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1001):
        x = torch.randn(n)
        codes, z, scale = quantize_affine(x, QuantSpec(bits))
        out = torch.empty(math.ceil(n * bits / 8), dtype=torch.uint8)
        s, z, scale = affine_params(x.min().view(1), x.max().view(1), QuantSpec(bits))
        assert kernels.quantize_pack(x, s, z, bits, out)
        assert torch.equal(out, pack_codes(codes, bits)), n
        deq = torch.empty(n)
        assert kernels.unpack_dequantize(out, z, scale, bits, n, deq)
        ref = (unpack_codes(out, bits, n).float() - z) * scale
        assert torch.equal(deq, ref), n


# ------------------------------------------------------------------------------------- sub_minmax

SIZES = [1, 2, 7, 4096, 3 * 4096 + 5, 70001]


@pytest.mark.parametrize("n", SIZES)
def test_sub_minmax_matches_torch(n, torch_path):
    a, b = torch.randn(n), torch.randn(n) * 0.1
    out, lo, hi, finite = kernels.sub_minmax(a, b)
    ref = a - b
    assert finite
    assert torch.equal(out, ref)
    assert lo == float(ref.min()) and hi == float(ref.max())
    # b = None copies a
    out2, lo2, hi2, finite2 = kernels.sub_minmax(a, None)
    assert finite2 and torch.equal(out2, a) and out2.data_ptr() != a.data_ptr()
    assert lo2 == float(a.min()) and hi2 == float(a.max())
    # a given output buffer is used
    buf = torch.empty(n)
    out3, lo3, hi3, _ = kernels.sub_minmax(a, b, out=buf)
    assert out3.data_ptr() == buf.data_ptr() and torch.equal(buf, ref)
    # the torch fallback agrees
    with torch_path:
        out4, lo4, hi4, finite4 = kernels.sub_minmax(a, b)
    assert torch.equal(out4, ref) and (lo4, hi4, finite4) == (lo, hi, finite)


def test_sub_minmax_shapes_and_dtypes():
    a, b = torch.randn(5, 6, 7, dtype=torch.float64), torch.randn(5, 6, 7, dtype=torch.float16)
    out, lo, hi, finite = kernels.sub_minmax(a, b)
    ref = a.float() - b.float()
    assert out.shape == a.shape and out.dtype == torch.float32
    assert torch.equal(out, ref) and finite
    assert lo == float(ref.min()) and hi == float(ref.max())
    out, lo, hi, finite = kernels.sub_minmax(torch.empty(0), torch.empty(0))
    assert out.numel() == 0 and finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("n", SIZES)
def test_sub_minmax_reports_non_finite(n, bad, torch_path):
    positions = sorted({0, n // 2, n - 1})
    for pos in positions:
        for where in ("a", "b", "a_only_no_b"):
            a, b = torch.randn(n), torch.randn(n)
            if where == "b":
                b[pos] = bad
            else:
                a[pos] = bad
            bb = None if where == "a_only_no_b" else b
            out, lo, hi, finite = kernels.sub_minmax(a, bb)
            assert not finite, (n, bad, pos, where)
            ref = a - b if bb is not None else a
            assert torch.equal(out.isnan(), ref.isnan())
            assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))
            with torch_path:
                assert not kernels.sub_minmax(a, bb)[3]
    # inf - inf is nan: also not finite
    a, b = torch.zeros(n), torch.zeros(n)
    a[-1] = b[-1] = math.inf
    assert not kernels.sub_minmax(a, b)[3]


# ------------------------------------------------------------------------------------ empty tensors

@pytest.mark.parametrize("bits", [1, 3, 8])
def test_empty_tensors(bits, torch_path):
    """Tensors with no elements quantize to no bytes on both paths and come back with their shape."""
    for gran, g in (("tensor", 128), ("channel", 128), ("group", 4), ("group", 3)):
        spec = QuantSpec(bits, gran, g)
        for shape in ((0,), (0, 5), (5, 0), (2, 0, 3)):
            x = torch.empty(shape)
            qn = QTensor.quantize(x, spec)
            with torch_path:
                qt = QTensor.quantize(x, spec)
                dt = qt.dequantize()
                assert fake_quantize(x, spec).shape == x.shape
            assert qn.packed.numel() == qt.packed.numel() == 0
            assert torch.equal(qn.zero_point, qt.zero_point) and torch.equal(qn.scale, qt.scale)
            assert qn.dequantize().shape == dt.shape == x.shape, (spec, shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("n", [1, 5, 8, 1001])
def test_code_histogram_counts_the_codes_not_the_padding(bits, n):
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    got = kernels.code_histogram(pack_codes(codes, bits), bits, n)
    assert torch.equal(got, torch.bincount(codes.long(), minlength=1 << bits))
