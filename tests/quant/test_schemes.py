"""FQ, TVQ and RTVQ (docs/algorithms.md §3) on synthetic weights shaped like a CLIP ViT's."""
from __future__ import annotations

import math

import pytest
import torch

from tvq_lightning.quant.affine import fake_quantize
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.schemes import (
    effective_bits_rtvq,
    fq_quantize,
    fq_task_vector,
    relative_l2_error,
    rtvq_base,
    rtvq_offset,
    rtvq_quantize,
    rtvq_reconstruct,
    tvq_quantize,
)


def model_rel_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """||approx - exact|| / ||exact|| over a whole (multi-tensor) model."""
    num = math.sqrt(sum(float(((a.double() - e.double()) ** 2).sum()) for a, e in zip(approx, exact)))
    den = math.sqrt(sum(float((e.double() ** 2).sum()) for e in exact))
    return num / den


def clip_like_weights(gen: torch.Generator) -> list[torch.Tensor]:
    """Pre-trained matrices like a CLIP ViT-B's: std ~0.02, per-tensor ranges set by outliers."""
    d = 768
    # Gaussian body with a handful of outliers of magnitude ~1 (the attention / MLP outlier dims)
    w1 = torch.randn(d, d, generator=gen) * 0.02
    idx = torch.randint(0, d * d, (6,), generator=gen)
    signs = torch.where(torch.rand(6, generator=gen) < 0.5, -1.0, 1.0)
    w1.view(-1)[idx] = signs * (0.6 + 0.8 * torch.rand(6, generator=gen))
    # heavy-tailed Student-t (df = 3) body, rescaled to std 0.02
    u = torch.distributions.StudentT(torch.tensor(3.0))
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    w2 = u.sample((d, d)) * (0.02 / math.sqrt(3.0))
    # a smaller Gaussian projection without planted outliers
    w3 = torch.randn(d, 256, generator=gen) * 0.02
    return [w1.float(), w2.float(), w3.float()]


@pytest.fixture(scope="module")
def clip_like():
    gen = torch.Generator().manual_seed(1234)
    theta0 = clip_like_weights(gen)
    # fine-tuning moves weights by ~5 % of their std (task-vector std 1e-3 vs weight std 2e-2)
    taus = [torch.randn(w.shape, generator=gen) * 1e-3 for w in theta0]
    thetas = [w + t for w, t in zip(theta0, taus)]
    return theta0, thetas, taus


def tvq_error(taus, bits):
    return model_rel_error([tvq_quantize(t, QuantSpec(bits)).dequantize() for t in taus], taus)


def fq_error(theta0, thetas, taus, bits):
    return model_rel_error([fq_task_vector(fq_quantize(th, QuantSpec(bits)), w0) for th, w0 in zip(thetas, theta0)],
                           taus)


# -------------------------------------------------------------------------------------------- TVQ

def test_tvq_error_decreases_with_bits(clip_like):
    _, _, taus = clip_like
    errs = {b: tvq_error(taus, b) for b in (8, 4, 3, 2)}
    assert errs[8] < errs[4] < errs[3] < errs[2]
    # roughly halves per extra bit: INT8 is far below INT4
    assert errs[8] < errs[4] / 8
    assert errs[4] < 0.5


def test_tvq_error_monotone_all_bits():
    tau = torch.randn(200, 300) * 1e-3
    errs = [relative_l2_error(tvq_quantize(tau, QuantSpec(b)).dequantize(), tau) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("bits", [4, 8])
def test_fq_error_much_larger_than_tvq(clip_like, bits):
    theta0, thetas, taus = clip_like
    fq = fq_error(theta0, thetas, taus, bits)
    tvq = tvq_error(taus, bits)
    assert fq >= 10 * tvq, (fq, tvq)
    if bits == 4:
        assert fq > 1.0  # FQ-INT4's task vector is mostly noise (the paper's collapse to chance)


@pytest.mark.parametrize("bits", [4, 8])
def test_fq_much_worse_per_tensor(clip_like, bits):
    """The gap holds for each CLIP-like matrix on its own, not only in the model total."""
    theta0, thetas, taus = clip_like
    for w0, th, tau in zip(theta0, thetas, taus):
        fq = relative_l2_error(fq_task_vector(fq_quantize(th, QuantSpec(bits)), w0), tau)
        tvq = relative_l2_error(tvq_quantize(tau, QuantSpec(bits)).dequantize(), tau)
        assert fq >= 10 * tvq, (fq, tvq)


def test_fq_task_vector_definition():
    w0 = torch.randn(30, 40) * 0.02
    th = w0 + torch.randn(30, 40) * 1e-3
    q = fq_quantize(th, QuantSpec(8))
    assert torch.equal(fq_task_vector(q, w0), q.dequantize() - w0)
    assert torch.equal(q.dequantize(), fake_quantize(th, QuantSpec(8)))


def test_tvq_is_quantized_task_vector():
    tau = torch.randn(17, 19) * 1e-3
    for spec in (QuantSpec(3), QuantSpec(4, "channel"), QuantSpec(2, "group", 5)):
        assert torch.equal(tvq_quantize(tau, spec).dequantize(), fake_quantize(tau, spec))


# ------------------------------------------------------------------------------------------- RTVQ

def make_taus(T: int, shape=(48, 70), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=gen) * 1e-3
    return [shared + torch.randn(shape, generator=gen) * 5e-4 for _ in range(T)]


SPEC_PAIRS = [
    (QuantSpec(3), QuantSpec(2)),  # B3O2, the default
    (QuantSpec(4), QuantSpec(2)),
    (QuantSpec(2), QuantSpec(1)),
    (QuantSpec(3, "channel"), QuantSpec(2, "group", 7)),
    (QuantSpec(8, symmetric=True), QuantSpec(3, symmetric=True)),
]


@pytest.mark.parametrize("pair", range(len(SPEC_PAIRS)))
@pytest.mark.parametrize("T", range(3, 9))
def test_rtvq_error_correction_leaves_only_offset_error(T, pair):
    base_spec, off_spec = SPEC_PAIRS[pair]
    taus = make_taus(T, seed=T * 10 + pair)
    key = rtvq_quantize(taus, base_spec, off_spec)  # error correction is the default
    beta = torch.stack(taus).mean(0)
    base_hat = key.base.dequantize()
    assert torch.equal(base_hat, fake_quantize(beta, base_spec))
    assert len(key.offsets) == T
    for t, tau in enumerate(taus):
        delta = tau - base_hat
        delta_hat = fake_quantize(delta, off_spec)
        assert torch.equal(key.offsets[t].dequantize(), delta_hat)
        rec = key.task_vector(t)
        assert torch.equal(rec, delta_hat + base_hat)
        assert torch.equal(rtvq_reconstruct(key.base, key.offsets[t]), rec)
        assert torch.equal(rtvq_reconstruct(base_hat, key.offsets[t]), rec)
        # tau_t - tau_hat_t == delta_t - x_hat(delta_t), up to float32 re-association
        atol = 2.0 ** -21 * float(torch.stack([tau.abs(), base_hat.abs(), delta_hat.abs()]).max())
        assert torch.allclose(tau - rec, delta - delta_hat, rtol=0, atol=atol)


@pytest.mark.parametrize("T", range(3, 9))
def test_rtvq_without_error_correction_keeps_base_error(T):
    base_spec, off_spec = QuantSpec(3), QuantSpec(2)
    taus = make_taus(T, seed=100 + T)
    beta = torch.stack(taus).mean(0)
    base_err = beta - fake_quantize(beta, base_spec)
    nc = rtvq_quantize(taus, base_spec, off_spec, error_correction=False)
    ec = rtvq_quantize(taus, base_spec, off_spec, error_correction=True)
    assert torch.equal(nc.base.dequantize(), ec.base.dequantize())
    tot_nc = tot_ec = 0.0
    for t, tau in enumerate(taus):
        delta = tau - beta  # offsets against the full-precision mean
        delta_hat = fake_quantize(delta, off_spec)
        assert torch.equal(nc.offsets[t].dequantize(), delta_hat)
        err = tau - nc.task_vector(t)
        atol = 2.0 ** -20 * float(tau.abs().max() + beta.abs().max())
        # the error is the offset's quantization error plus the base's
        assert torch.allclose(err, (delta - delta_hat) + base_err, rtol=0, atol=atol)
        assert not torch.allclose(err, delta - delta_hat, rtol=0, atol=atol)
        tot_nc += float(err.norm()) ** 2
        tot_ec += float((tau - ec.task_vector(t)).norm()) ** 2
    assert tot_ec < tot_nc


def test_rtvq_base_is_mean_of_task_vectors():
    taus = make_taus(5)
    q, beta = rtvq_base(taus, QuantSpec(3))
    assert torch.equal(beta, torch.stack(taus).mean(0))
    assert torch.equal(q.dequantize(), fake_quantize(beta, QuantSpec(3)))
    q1, beta1 = rtvq_base(taus[:1], QuantSpec(3))
    assert torch.equal(beta1, taus[0]) and beta1.data_ptr() != taus[0].data_ptr()


def test_rtvq_single_task_and_half_inputs():
    taus = [t.half() for t in make_taus(1)]
    key = rtvq_quantize(taus, QuantSpec(3), QuantSpec(2))
    rec = key.task_vector(0)
    assert rec.shape == taus[0].shape and rec.dtype == torch.float32
    assert key.task_vector(0, torch.float16).dtype == torch.float16


def test_rtvq_offset_needs_beta_without_error_correction():
    tau = torch.randn(4, 4)
    with pytest.raises(ValueError):
        rtvq_offset(tau, torch.zeros(4, 4), None, QuantSpec(2), error_correction=False)
    # with error correction beta is not needed
    q = rtvq_offset(tau, torch.zeros(4, 4), None, QuantSpec(2), error_correction=True)
    assert torch.equal(q.dequantize(), fake_quantize(tau, QuantSpec(2)))


def test_rtvq_beats_tvq_at_equal_bits():
    """B3O2 at T = 8 (2.375 bits) is closer to the task vectors than TVQ-INT2 for correlated tasks."""
    taus = make_taus(8, shape=(64, 64), seed=7)
    key = rtvq_quantize(taus, QuantSpec(3), QuantSpec(2))
    rtvq = model_rel_error([key.task_vector(t) for t in range(8)], taus)
    tvq2 = model_rel_error([tvq_quantize(t, QuantSpec(2)).dequantize() for t in taus], taus)
    assert rtvq < tvq2


# --------------------------------------------------------------------------------- bit accounting

def storage_fraction(b_base: int, b_off: int, T: int) -> float:
    return (b_base + T * b_off) / (32 * T)


def test_effective_bits_and_storage_fraction():
    assert effective_bits_rtvq(3, 2, 8) == 2.375
    assert storage_fraction(3, 2, 8) == pytest.approx(0.0742, abs=5e-5)
    assert storage_fraction(3, 2, 8) == effective_bits_rtvq(3, 2, 8) / 32
    for T in range(1, 21):
        for bb in range(1, 9):
            for bo in range(1, 9):
                assert effective_bits_rtvq(bb, bo, T) == pytest.approx(bo + bb / T)
                assert storage_fraction(bb, bo, T) == pytest.approx(effective_bits_rtvq(bb, bo, T) / 32)


@pytest.mark.parametrize("T", [1, 3, 8])
def test_packed_storage_matches_effective_bits(T):
    """The packed codes of a key take exactly b_base + T * b_off bits per parameter."""
    n_rows, n_cols = 64, 40  # 2560 values: whole bytes at every width
    key = rtvq_quantize(make_taus(T, shape=(n_rows, n_cols)), QuantSpec(3), QuantSpec(2))
    code_bytes = key.base.packed.numel() + sum(o.packed.numel() for o in key.offsets)
    fp32_bytes = 4 * n_rows * n_cols * T
    assert code_bytes * 8 == n_rows * n_cols * (3 + 2 * T)
    assert code_bytes / fp32_bytes == pytest.approx(storage_fraction(3, 2, T))


# ------------------------------------------------------------------------------- relative error

def test_relative_l2_error_edge_cases():
    z = torch.zeros(5, 6)
    assert relative_l2_error(z, z) == 0.0
    assert relative_l2_error(torch.zeros(0), torch.zeros(0)) == 0.0
    assert relative_l2_error(torch.ones(3), z[0, :3]) == math.inf
    x = torch.randn(7, 8)
    assert relative_l2_error(x, x) == 0.0
    assert relative_l2_error(2 * x, x) == pytest.approx(1.0)
    assert relative_l2_error(torch.zeros_like(x), x) == pytest.approx(1.0)
    assert relative_l2_error(x.half(), x) == pytest.approx(relative_l2_error(x.half().float(), x))
    a = torch.tensor([3.0, 0.0])
    b = torch.tensor([0.0, 4.0])
    assert relative_l2_error(a, b) == pytest.approx(5.0 / 4.0)
