"""The scheme registry and each built-in scheme's encode / decode against the pure functions."""
from __future__ import annotations

import pytest
import torch

from tvq_lightning.errors import QuantConfigError
from tvq_lightning.quant import create_scheme, list_schemes, register_scheme
from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.quant.schemes import (FP32, Scheme, TVQ, bitdelta_dequantize, bitdelta_quantize, fq_quantize,
                                         fq_task_vector, get_scheme, registered_scheme, rtvq_quantize, tvq_quantize,
                                         unregister_scheme)
from tvq_lightning.store.layout import KeyInfo, StoreConfig

BUILTIN = ["fp32", "fq", "tvq", "rtvq", "bitdelta"]


def test_builtins_are_listed_in_order():
    assert list_schemes()[:5] == BUILTIN
    for name in BUILTIN:
        s = create_scheme(name)
        assert isinstance(s, Scheme) and s.name == name
        assert create_scheme(name) is not s and get_scheme(name) is get_scheme(name)


def test_unknown_scheme_names_the_choices():
    with pytest.raises(QuantConfigError, match="scheme 'int3' is unknown: choose one of fp32, fq, tvq, rtvq, bitdelta"):
        create_scheme("int3")
    with pytest.raises(QuantConfigError, match="choose one of fp32, fq, tvq, rtvq, bitdelta"):
        StoreConfig(scheme="int3")


def test_register_and_unregister_do_not_leak():
    class Toy(TVQ):
        name = "toy_registry"

    before = list_schemes()
    with registered_scheme(Toy):
        assert list_schemes() == before + ["toy_registry"]
        assert StoreConfig(scheme="toy_registry").label == "TVQ-INT4"
    assert list_schemes() == before
    register_scheme(Toy)
    with pytest.raises(QuantConfigError, match="already registered"):
        register_scheme(type("Other", (TVQ,), {"name": "toy_registry"}))
    unregister_scheme("toy_registry")
    assert list_schemes() == before
    with pytest.raises(QuantConfigError, match="lower-case identifier"):
        register_scheme(type("Bad", (FP32,), {"name": "Bad-Name"}))


def test_budget_only_for_allocatable_schemes():
    for name in ("fp32", "fq"):
        with pytest.raises(QuantConfigError, match=f"--budget applies to the tvq and rtvq and bitdelta schemes, not {name}"):
            StoreConfig(scheme=name, budget=3.0)
    StoreConfig(scheme="bitdelta", budget=1.0)


def _info(shape) -> KeyInfo:
    return KeyInfo(tuple(shape), "float32", True, bits=4, base_bits=3, offset_bits=2)


def _parts(named: dict, key: str) -> dict:
    return {k[len(key):]: v for k, v in named.items()}


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_tvq_and_fq_match_the_pure_functions(granularity):
    g = torch.Generator().manual_seed(0)
    tau, pre = torch.randn(12, 20, generator=g) * 1e-2, torch.randn(12, 20, generator=g)
    info = _info(tau.shape)
    for name, cfg in (("tvq", StoreConfig("tvq", granularity=granularity, group_size=16)),
                      ("fq", StoreConfig("fq", granularity=granularity, group_size=16))):
        s = get_scheme(name)
        named = s.encode_task(tau, float(tau.min()), float(tau.max()), info, cfg, "w", finetuned=pre + tau)
        shared = s.decode_shared(cfg, info, None, pre)
        got = s.decode(cfg, info, _parts(named, "w"), shared)
        if name == "tvq":
            want = tvq_quantize(tau, cfg.spec(4)).dequantize()
        else:
            want = fq_task_vector(fq_quantize(pre + tau, cfg.spec(4)), pre)
        assert torch.equal(got, want)


@pytest.mark.parametrize("ec", [True, False])
def test_rtvq_joint_matches_rtvq_quantize(ec):
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(10, 30, generator=g) * 1e-2 for _ in range(3)]
    cfg, info, s = StoreConfig("rtvq", error_correction=ec), _info((10, 30)), get_scheme("rtvq")
    ref = rtvq_quantize(taus, cfg.spec(3), cfg.spec(2), ec)
    shared, per_task = s.encode_joint([t.clone() for t in taus], [(float(t.min()), float(t.max())) for t in taus],
                                      info, cfg, "w")
    base_hat = s.decode_shared(cfg, info, _parts(shared, "w"))
    for i, named in enumerate(per_task):
        assert torch.equal(s.decode(cfg, info, _parts(named, "w"), base_hat), ref.task_vector(i))


def test_fp32_stores_the_exact_vector_and_nothing_for_zero():
    s, cfg, tau = get_scheme("fp32"), StoreConfig("fp32"), torch.randn(3, 4)
    info = KeyInfo((3, 4), "float32", False)
    assert torch.equal(s.decode(cfg, info, _parts(s.encode_task(tau, -1.0, 1.0, info, cfg, "w"), "w")), tau)
    assert s.encode_task(torch.zeros(3, 4), 0.0, 0.0, info, cfg, "w") == {}


def test_bitdelta_formula_per_tensor_and_per_row():
    tau = torch.tensor([[1.0, -3.0, 0.0, 2.0], [-0.5, 0.5, -1.0, 4.0], [0.0, 0.0, 0.0, -8.0]])
    packed, alpha = bitdelta_quantize(tau)
    assert packed.numel() == 2 and alpha.shape == (1,)              # 12 entries -> 12 bits -> 2 bytes
    assert alpha.item() == pytest.approx(tau.abs().mean().item())
    sign = torch.where(tau >= 0, 1.0, -1.0)                         # sign(0) = +1
    assert torch.equal(bitdelta_dequantize(packed, alpha, tau.shape), alpha * sign)
    packed, alpha = bitdelta_quantize(tau, "channel")
    torch.testing.assert_close(alpha, tau.abs().mean(1))
    assert torch.equal(bitdelta_dequantize(packed, alpha, tau.shape), alpha.view(-1, 1) * sign)


def test_bitdelta_scheme_parts_and_levels():
    s, cfg = get_scheme("bitdelta"), StoreConfig("bitdelta", granularity="channel")
    tau = torch.randn(6, 13)
    info = KeyInfo((6, 13), "float32", True, **s.key_widths(cfg, "w"))
    assert info.bits == 1 and cfg.label == "BitDelta-row" and StoreConfig("bitdelta").label == "BitDelta"
    named = s.encode_task(tau, float(tau.min()), float(tau.max()), info, cfg, "w")
    assert set(named) == {"w#q", "w#s"} and named["w#q"].numel() == (6 * 13 + 7) // 8 and named["w#s"].numel() == 6
    parts = _parts(named, "w")
    got = s.decode(cfg, info, parts)
    torch.testing.assert_close(got.abs(), tau.abs().mean(1, keepdim=True).expand(6, 13))
    values, counts = s.levels(cfg, info, parts)
    assert counts.tolist() == [13] * 6 and torch.equal(values, got.abs()[:, 0])
    for bad in (dict(granularity="group"), dict(symmetric=True)):
        with pytest.raises(QuantConfigError):
            StoreConfig("bitdelta", **bad)


def test_rtvq_label_says_when_error_correction_is_off():
    assert StoreConfig("rtvq").label == "RTVQ-B3O2"
    assert StoreConfig("rtvq", error_correction=False).label == "RTVQ-B3O2-noEC"
    assert StoreConfig("rtvq", budget=2.5, per_tensor_bits=True).label == "RTVQ-budget2.5"
    assert StoreConfig("rtvq", budget=2.5, error_correction=False).label == "RTVQ-budget2.5-noEC"


def test_qtensor_helper_reads_affine_parts():
    s, cfg = get_scheme("tvq"), StoreConfig("tvq", bits=3)
    tau = torch.randn(5, 7)
    q = QTensor.quantize(tau, cfg.spec(3))
    info = KeyInfo((5, 7), "float32", True, bits=3)
    assert torch.equal(s.qtensor(cfg, info, _parts(q.state("k"), "k")).dequantize(), q.dequantize())
    assert s.qtensor(cfg, info, {}) is None
