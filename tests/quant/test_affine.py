"""The affine quantizer's invariants (docs/algorithms.md §2) for every bit width and granularity.

Every invariant is checked on both implementations of the quantizer: the pure torch reference
(``fake_quantize`` / ``quantize_affine``) and ``QTensor`` (numba kernels when available).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvq_lightning.errors import QuantConfigError
from tvq_lightning.quant.affine import (
    affine_params,
    dequantize_affine,
    error_bound,
    fake_quantize,
    quantize_affine,
)
from tvq_lightning.quant.config import QuantSpec, check_bits
from tvq_lightning.quant.qtensor import QTensor

from _affine_helpers import BITS, BITS_SYM, PATHS, SPECS, check_bound, fq_qtensor, fq_torch, levels, rand_tensor, spec_id, specs_for  # noqa: E402

# ----------------------------------------------------------------------------------- codes / bound

@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_codes_in_range_and_error_bound(bits, sym):
    for spec in specs_for(bits, sym):
        x = rand_tensor((37, 53), scale=0.3)
        codes, z, scale = quantize_affine(x, spec)
        assert codes.dtype == torch.uint8
        assert int(codes.max()) <= levels(spec.bits)
        q = QTensor.quantize(x, spec)
        qc = q.codes()
        assert int(qc.max()) <= levels(spec.bits)
        # codes of the reference and of QTensor agree; so do the block parameters
        assert torch.equal(qc.reshape(-1), codes.reshape(-1))
        assert torch.equal(q.zero_point.float(), z)
        assert torch.equal(q.scale, scale)
        n_blocks = {"tensor": 1, "channel": 37, "group": -(-37 * 53 // spec.group_size)}[spec.granularity]
        assert z.numel() == scale.numel() == n_blocks
        for fq in (fq_torch, fq_qtensor):
            check_bound(x, fq(x, spec), spec)


@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_dequantize_affine_matches_formula(bits, sym):
    for spec in specs_for(bits, sym):
        x = rand_tensor((11, 13))
        codes, z, scale = quantize_affine(x, spec)
        out = dequantize_affine(codes, z, scale, x.shape)
        rows = codes.float().view(z.numel(), -1)
        expected = ((rows - z[:, None]) * scale[:, None]).reshape(-1)[: x.numel()].view(x.shape)
        assert torch.equal(out, expected)
        # codes follow q = clamp(round(s * x + z), 0, L) with the documented float32 s and z
        if spec.granularity == "tensor":
            s, z2, sc2 = affine_params(x.min().view(1), x.max().view(1), spec)
            assert torch.equal(z2, z) and torch.equal(sc2, scale)
            ref = torch.clamp(torch.round(x.reshape(1, -1) * s[:, None] + z[:, None]), 0, levels(spec.bits))
            assert torch.equal(ref.to(torch.uint8), codes)


@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_params_follow_spec(bits):
    """s = L / (hi - lo), z = -round(s * lo), scale = 1 / s (float64 then float32)."""
    x = rand_tensor((1000,), scale=0.02, offset=0.001)
    lo, hi = float(x.min()), float(x.max())
    s, z, scale = affine_params(x.min().view(1), x.max().view(1), QuantSpec(bits))
    L = levels(bits)
    assert float(s) == pytest.approx(L / (hi - lo), rel=1e-6)
    assert float(z) == -round(L / (hi - lo) * lo)  # python round is half-to-even too
    assert float(z) == int(float(z))
    assert float(scale) == pytest.approx((hi - lo) / L, rel=1e-6)
    assert error_bound(x, QuantSpec(bits)) == pytest.approx((hi - lo) / (2 * L))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.granularity == "tensor"], ids=spec_id)
def test_error_bound_helper_holds(spec):
    x = rand_tensor((4096,))
    err = float((fake_quantize(x, spec) - x).abs().max())
    assert err <= error_bound(x, spec) * (1 + 1e-5) + 1e-7


# ------------------------------------------------------------------------------------- exact zero

@pytest.mark.parametrize("bits, sym", BITS_SYM)
def test_zero_maps_exactly_to_zero(bits, sym):
    for spec in specs_for(bits, sym):
        for path in PATHS:
            x = rand_tensor((29, 31), scale=1.7, offset=0.2)
            flat = x.view(-1)
            zero_at = torch.randperm(flat.numel())[:97]
            flat[zero_at] = 0.0
            flat[0] = 0.0
            flat[-1] = 0.0
            xh = path(x, spec)
            assert (xh.view(-1)[zero_at] == 0).all()
            assert xh.view(-1)[0] == 0 and xh.view(-1)[-1] == 0
            check_bound(x, xh, spec)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", BITS)
def test_zero_exact_when_range_touches_zero(bits, path):
    """lo == 0 or hi == 0 exactly is an edge of the zero-point computation."""
    for x in (torch.rand(500) + 0.0, -torch.rand(500)):
        x[17] = 0.0
        xh = path(x, QuantSpec(bits))
        assert xh[17] == 0
        check_bound(x, xh, QuantSpec(bits))


# ------------------------------------------------------------------------------- round half-even

def _half_grid(bits: int, step: float) -> torch.Tensor:
    """Values whose code-space image (lo = 0, hi = L*step, so s = 1/step, z = 0) is k + 0.5."""
    L = levels(bits)
    halves = torch.arange(L, dtype=torch.float64) + 0.5
    ints = torch.arange(L + 1, dtype=torch.float64)
    return (torch.cat([ints, halves]) * step).float()


@pytest.mark.parametrize("step", [1.0, 0.5, 0.25, 4.0])
@pytest.mark.parametrize("bits", BITS)
def test_round_half_to_even_asymmetric(bits, step):
    x = _half_grid(bits, step)
    spec = QuantSpec(bits)
    codes, z, scale = quantize_affine(x, spec)
    assert float(z) == 0.0 and float(scale) == step
    expected = torch.round(x.double() / step)  # torch.round: half to even
    assert torch.equal(codes.view(-1).double(), expected)
    # explicit half-to-even: k + 0.5 -> the even one of k, k + 1
    L = levels(bits)
    for k in range(L):
        code = int(codes.view(-1)[L + 1 + k])
        assert code == (k if k % 2 == 0 else k + 1)
    assert torch.equal(QTensor.quantize(x, spec).codes().view(-1).double(), expected)


@pytest.mark.parametrize("bits", BITS)
def test_round_half_to_even_per_channel_and_group(bits):
    row = _half_grid(bits, 1.0)
    x = torch.stack([row[torch.randperm(row.numel())] for _ in range(5)])
    expected = torch.round(x.double())
    for spec in (QuantSpec(bits, "channel"), QuantSpec(bits, "group", group_size=row.numel())):
        codes, _, _ = quantize_affine(x, spec)
        assert torch.equal(codes.reshape(-1).double(), expected.reshape(-1)), spec
        qc = QTensor.quantize(x, spec).codes()
        assert torch.equal(qc.reshape(-1).double(), expected.reshape(-1)), spec


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_half_to_even_symmetric(bits):
    half = (1 << (bits - 1)) - 1
    zp = 1 << (bits - 1)
    k = torch.arange(1, 2 * zp - 1, dtype=torch.float64)  # k + 0.5 stays inside [1, 2^b - 1]
    x = torch.cat([torch.tensor([-half, half], dtype=torch.float64), k + 0.5 - zp]).float()
    spec = QuantSpec(bits, symmetric=True)
    codes, z, scale = quantize_affine(x, spec)
    assert float(z) == zp and float(scale) == 1.0
    expected = torch.round(x.double() + zp)
    assert torch.equal(codes.view(-1).double(), expected)
    assert torch.equal(QTensor.quantize(x, spec).codes().view(-1).double(), expected)


# --------------------------------------------------------------------------------- misc behaviour

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fake_quantize_keeps_dtype_and_shape(dtype):
    x = torch.randn(4, 5, 6).to(dtype)
    xh = fake_quantize(x, QuantSpec(4))
    assert xh.dtype == dtype and xh.shape == x.shape
    q = QTensor.quantize(x, QuantSpec(4))
    assert q.dequantize(dtype).dtype == dtype
    assert q.dequantize().shape == x.shape


def test_integer_tensor_rejected():
    with pytest.raises(TypeError):
        quantize_affine(torch.arange(10), QuantSpec(4))
    with pytest.raises(TypeError):
        QTensor.quantize(torch.arange(10), QuantSpec(4))


def test_qtensor_state_round_trip():
    x = torch.randn(9, 11)
    spec = QuantSpec(3, "group", 5)
    q = QTensor.quantize(x, spec)
    st_ = q.state("a.weight")
    assert set(st_) == {"a.weight#q", "a.weight#z", "a.weight#s"}
    q2 = QTensor.from_state(st_["a.weight#q"], st_["a.weight#z"], st_["a.weight#s"], x.shape, spec)
    assert torch.equal(q2.dequantize(), q.dequantize())
    assert q.packed.numel() == (math.ceil(99 / 5) * 5 * 3 + 7) // 8
    with pytest.raises(ValueError):
        QTensor.from_state(st_["a.weight#q"][:-1], st_["a.weight#z"], st_["a.weight#s"], x.shape, spec)


# ---------------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.5, True, False, "4", None])
def test_bad_bits_rejected(bits):
    with pytest.raises(QuantConfigError):
        QuantSpec(bits=bits)
    with pytest.raises(QuantConfigError):
        check_bits(bits)


@pytest.mark.parametrize("bits", BITS)
def test_good_bits_accepted(bits):
    assert check_bits(bits) == bits
    assert QuantSpec(bits).bits == bits


def test_symmetric_one_bit_rejected():
    with pytest.raises(QuantConfigError):
        QuantSpec(1, symmetric=True)
    with pytest.raises(QuantConfigError):
        QuantSpec(4, symmetric=True).with_bits(1)


@pytest.mark.parametrize("kwargs", [dict(granularity="row"), dict(granularity="group", group_size=0),
                                    dict(granularity="group", group_size=-3),
                                    dict(granularity="group", group_size=2.5)])
def test_bad_granularity_rejected(kwargs):
    with pytest.raises(QuantConfigError):
        QuantSpec(4, **kwargs)


def test_quant_config_error_is_value_error():
    with pytest.raises(ValueError):
        QuantSpec(bits=9)


def test_spec_json_round_trip():
    spec = QuantSpec(3, "group", 77, True)
    assert QuantSpec.from_json(spec.to_json()) == spec


# ------------------------------------------------------------------------------------ hypothesis

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 17), min_size=1, max_size=3),
    bits=st.integers(1, 8),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.integers(1, 40),
    symmetric=st.booleans(),
    log_scale=st.floats(-12, 12),
    offset=st.floats(-3, 3),
    zeros=st.booleans(),
    seed=st.integers(0, 2 ** 31 - 1),
)
def test_hypothesis_invariants(shape, bits, gran, group_size, symmetric, log_scale, offset, zeros, seed):
    if symmetric and bits < 2:
        symmetric = False
    spec = QuantSpec(bits, gran, group_size, symmetric)
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** log_scale
    x = ((torch.randn(shape, generator=gen, dtype=torch.float64) + offset) * scale).float()
    if zeros:
        x.view(-1)[:: 3] = 0.0
    codes, _, _ = quantize_affine(x, spec)
    assert int(codes.max()) <= levels(bits)
    for fq in (fq_torch, fq_qtensor):
        xh = fq(x, spec)
        check_bound(x, xh, spec)
        if zeros:
            assert (xh.view(-1)[:: 3] == 0).all()
    q = QTensor.quantize(x, spec)
    assert torch.equal(q.codes().reshape(-1), codes.reshape(-1))
