"""Bit allocation under a memory budget: error tables, uniform and per-tensor allocation."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvq_lightning.errors import BudgetError
from tvq_lightning.quant import error_tables as A  # stage 1 (error tables) internals
from tvq_lightning.quant.allocation import (Allocation, ErrorTable, allocate_bits, allocate_from_taus,
                                            key_error_table)
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.schemes import rtvq_quantize, tvq_quantize


def taus_like(T: int, shape: tuple[int, ...], scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """Gaussian task vectors sharing a common component (as real task vectors do)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g) * scale
    return [shared + 0.7 * scale * torch.randn(shape, generator=g) + 0.1 * scale * t for t in range(T)]


def storage(alloc: Allocation, tables: dict[str, ErrorTable]) -> float:
    N = sum(t.numel for t in tables.values())
    if alloc.scheme == "tvq":
        return sum(tables[k].numel * b for k, b in alloc.bits.items()) / N
    T = alloc.num_tasks
    return sum(tables[k].numel * (alloc.offset_bits[k] + alloc.base_bits[k] / T) for k in tables) / N


def objective(alloc: Allocation, tables: dict[str, ErrorTable], w: dict[str, float] | None = None) -> float:
    w = w or {k: 1.0 for k in tables}
    if alloc.scheme == "tvq":
        return sum(w[k] * float(tables[k].errors[alloc.bits[k] - 1]) for k in tables)
    return sum(w[k] * float(tables[k].errors[alloc.base_bits[k] - 1, alloc.offset_bits[k] - 1]) for k in tables)


SPECS = [QuantSpec(), QuantSpec(granularity="channel"), QuantSpec(granularity="group", group_size=48),
         QuantSpec(symmetric=True)]


# --------------------------------------------------------------------------- error tables


@pytest.mark.parametrize("spec", SPECS, ids=["tensor", "channel", "group", "symmetric"])
def test_tvq_table_equals_measured_error(spec):
    taus = taus_like(3, (12, 20))
    table = key_error_table(taus, "tvq", spec=spec)
    assert table.errors.shape == (8,) and table.numel == 240 and table.num_tasks == 3
    for b in range(1, 9):
        if spec.symmetric and b == 1:
            assert math.isinf(table.errors[0])
            continue
        want = sum(float((t - tvq_quantize(t, spec.with_bits(b)).dequantize()).double().pow(2).sum()) for t in taus)
        assert float(table.errors[b - 1]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("spec,fast", [(SPECS[0], False), (SPECS[0], True), (SPECS[1], False), (SPECS[2], False)],
                         ids=["tensor-torch", "tensor-numba", "channel", "group"])
@pytest.mark.parametrize("ec", [True, False], ids=["ec", "no-ec"])
def test_rtvq_table_equals_measured_error(monkeypatch, spec, ec, fast):
    if fast and A.njit is None:
        pytest.skip("numba not installed")
    monkeypatch.setattr(A, "_FAST_MIN", 0 if fast else 1 << 62)
    taus = taus_like(3, (10, 16), seed=1)
    table = key_error_table(taus, "rtvq", spec=spec, error_correction=ec)
    assert table.errors.shape == (8, 8)
    for bb in (1, 3, 8):
        for bo in (1, 2, 5, 8):
            q = rtvq_quantize(taus, spec.with_bits(bb), spec.with_bits(bo), error_correction=ec)
            if ec:  # the offset's own quantization error is the whole error
                base_hat = q.base.dequantize()
                want = sum(float(((t - base_hat) - o.dequantize()).double().pow(2).sum())
                           for t, o in zip(taus, q.offsets))
            else:
                want = sum(float((t - q.task_vector(i)).double().pow(2).sum()) for i, t in enumerate(taus))
            assert float(table.errors[bb - 1, bo - 1]) == pytest.approx(want, rel=1e-5), (bb, bo)


@pytest.mark.skipif(A.njit is None, reason="numba not installed")
@pytest.mark.parametrize("scheme,ec", [("tvq", True), ("rtvq", True), ("rtvq", False)])
def test_numba_and_torch_paths_agree(monkeypatch, scheme, ec):
    monkeypatch.setattr(A, "_FAST_MIN", 0)
    taus = taus_like(4, (33, 50), seed=2)
    fast = key_error_table(taus, scheme, error_correction=ec, max_samples=999)
    monkeypatch.setenv("TVQ_DISABLE_NUMBA", "1")
    slow = key_error_table(taus, scheme, error_correction=ec, max_samples=999)
    torch.testing.assert_close(fast.errors, slow.errors, rtol=1e-9, atol=0)


@pytest.mark.skipif(A.njit is None, reason="numba not installed")
def test_offset_ranges_binning_is_exact(monkeypatch):
    """The per-bin trick gives exactly the min/max of tau_t - x_hat(beta) for every base width."""
    monkeypatch.setattr(A, "_FAST_MIN", 0)
    xs = [t.reshape(-1).contiguous() for t in taus_like(5, (70, 30), seed=3)]
    beta = torch.stack(xs).mean(0)
    spec = QuantSpec()
    bp = A._params(*A.block_ranges(A._rows(beta, spec)), spec)
    fast = A._offset_ranges(xs, beta, bp, spec, (2100,))
    monkeypatch.setenv("TVQ_DISABLE_NUMBA", "1")
    slow = A._offset_ranges(xs, beta, bp, spec, (2100,))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("ec", [True, False])
def test_tables_decrease_with_bits_for_gaussian_data(ec):
    taus = taus_like(4, (64, 80), seed=4)
    tvq = key_error_table(taus, "tvq").errors
    assert (tvq[1:] <= tvq[:-1]).all()
    rtvq = key_error_table(taus, "rtvq", error_correction=ec).errors
    # more offset bits never hurt, at every base width; without error correction the curve flattens
    # at the base's own error, where the cross term adds noise of a few parts in 10^4
    assert (rtvq[:, 1:] <= rtvq[:, :-1] * (1 if ec else 1.001)).all()
    assert (rtvq[:, -1] < rtvq[:, 0]).all() and rtvq[-1, -1] < rtvq[0, 0]


def test_sampled_table_estimates_full_table():
    taus = taus_like(3, (150, 200), seed=5)
    full = key_error_table(taus, "rtvq", max_samples=1 << 20)
    est = key_error_table(taus, "rtvq", max_samples=4096)
    torch.testing.assert_close(est.errors[:, :6], full.errors[:, :6], rtol=0.1, atol=0)
    assert torch.equal(est.errors, key_error_table(taus, "rtvq", max_samples=4096).errors)  # seeded
    tvq_full, tvq_est = (key_error_table(taus, "tvq", max_samples=m).errors for m in (1 << 20, 4096))
    torch.testing.assert_close(tvq_est[:6], tvq_full[:6], rtol=0.1, atol=0)
    assert est.numel == 30000


def test_empty_and_constant_tensors():
    assert key_error_table([torch.zeros(0, 4)] * 2, "rtvq").errors.eq(0).all()
    zero = key_error_table([torch.zeros(5, 5)] * 3, "tvq")
    assert zero.errors.eq(0).all()
    alloc = allocate_bits({"k": zero}, 4.0, num_tasks=3, scheme="tvq")
    assert alloc.bits == {"k": 1}  # ties go to fewer bits


# --------------------------------------------------------------------------- uniform allocation


def real_tables(scheme: str, T: int, ec: bool = True) -> dict[str, ErrorTable]:
    shapes = {"a": (32, 48), "b": (64, 16), "c": (20, 20)}
    return {k: key_error_table(taus_like(T, s, scale=1.0 + i, seed=10 + i), scheme, error_correction=ec)
            for i, (k, s) in enumerate(shapes.items())}


def test_uniform_tvq_budget_boundaries():
    tables = real_tables("tvq", 4)
    for budget, bits in [(4.0, 4), (3.999, 3), (1.0, 1), (8.0, 8), (100.0, 8)]:
        alloc = allocate_bits(tables, budget, num_tasks=4, scheme="tvq")
        assert set(alloc.bits.values()) == {bits}, budget
        assert alloc.bits_per_param == bits and not alloc.per_tensor
    assert allocate_bits(tables, 4.0, num_tasks=4, scheme="tvq", max_bits=3).bits["a"] == 3


@pytest.mark.parametrize("budget", [2.375, 2.5, 1.125, 3.0])
def test_uniform_rtvq_is_brute_force_optimum(budget):
    T = 8
    tables = real_tables("rtvq", T)
    alloc = allocate_bits(tables, budget, num_tasks=T, scheme="rtvq")
    feasible = [(bb, bo) for bb in range(1, 9) for bo in range(1, 9) if bo + bb / T <= budget + 1e-12]
    objs = {p: sum(float(t.errors[p[0] - 1, p[1] - 1]) for t in tables.values()) for p in feasible}
    chosen = (alloc.base_bits["a"], alloc.offset_bits["a"])
    assert set(alloc.base_bits.values()) == {chosen[0]} and set(alloc.offset_bits.values()) == {chosen[1]}
    assert chosen in feasible and storage(alloc, tables) <= budget
    assert objs[chosen] == pytest.approx(min(objs.values()), rel=1e-12)
    assert alloc.objective == pytest.approx(objs[chosen], rel=1e-12)
    if budget == 2.375:  # B3O2 is exactly on the boundary and allowed
        assert (3, 2) in feasible and objs[chosen] <= objs[(3, 2)]


# --------------------------------------------------------------------------- per-tensor allocation


def synthetic_tables(draw, scheme: str, T: int, K: int) -> dict[str, ErrorTable]:
    tables = {}
    for k in range(K):
        numel = draw(st.integers(1, 1000))
        shape = (8,) if scheme == "tvq" else (8, 8)
        vals = draw(st.lists(st.floats(0.0, 1e3), min_size=math.prod(shape), max_size=math.prod(shape)))
        tables[f"k{k}"] = ErrorTable(numel, scheme, T, torch.tensor(vals, dtype=torch.float64).view(shape))
    return tables


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_budget_respected_and_per_tensor_not_worse(data):
    scheme = data.draw(st.sampled_from(["tvq", "rtvq"]))
    T = data.draw(st.integers(1, 10))
    tables = synthetic_tables(data.draw, scheme, T, data.draw(st.integers(1, 6)))
    lo = data.draw(st.integers(1, 3))
    minimum = lo if scheme == "tvq" else lo + lo / T
    budget = data.draw(st.floats(minimum, 9.5))
    w = data.draw(st.none() | st.fixed_dictionaries({k: st.floats(0.0, 100.0) for k in tables}))
    kw = dict(num_tasks=T, scheme=scheme, sensitivity=w, min_bits=lo)
    uni = allocate_bits(tables, budget, **kw)
    per = allocate_bits(tables, budget, per_tensor=True, **kw)
    for alloc in (uni, per):
        assert storage(alloc, tables) <= budget * (1 + 1e-12)
        assert alloc.bits_per_param == pytest.approx(storage(alloc, tables), rel=1e-12)
        assert alloc.objective == pytest.approx(objective(alloc, tables, w), rel=1e-9, abs=1e-9)
        assert min((alloc.bits or alloc.base_bits).values()) >= lo
    assert per.objective <= uni.objective * (1 + 1e-12) + 1e-12
    assert per.per_tensor


def test_per_tensor_handles_non_convex_curves():
    # +1 bit on "a" gains nothing, +2 bits gain almost everything: greedy must see the jump
    a = ErrorTable(100, "tvq", 1, torch.tensor([100.0, 100.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64))
    b = ErrorTable(100, "tvq", 1, torch.tensor([10.0, 5, 2.5, 1.2, 0.6, 0.3, 0.15, 0.07], dtype=torch.float64))
    alloc = allocate_bits({"a": a, "b": b}, 2.0, num_tasks=1, scheme="tvq", per_tensor=True)
    assert alloc.bits == {"a": 3, "b": 1} and alloc.objective == 11.0
    assert allocate_bits({"a": a, "b": b}, 2.0, num_tasks=1, scheme="tvq").objective == 105.0


@pytest.mark.parametrize("scheme", ["tvq", "rtvq"])
def test_per_tensor_follows_sensitivity_and_range(scheme):
    T = 4
    taus = taus_like(T, (40, 40), seed=7)
    same = key_error_table(taus, scheme)
    wide = key_error_table([10 * t for t in taus], scheme)
    budget = 4.0 if scheme == "tvq" else 3.0

    def cost(alloc, k):
        return alloc.bits[k] if scheme == "tvq" else alloc.offset_bits[k] + alloc.base_bits[k] / T

    alloc = allocate_bits({"x": same, "y": same}, budget, num_tasks=T, scheme=scheme, per_tensor=True,
                          sensitivity={"x": 100.0, "y": 1.0})
    assert cost(alloc, "x") > cost(alloc, "y")
    alloc = allocate_bits({"narrow": same, "wide": wide}, budget, num_tasks=T, scheme=scheme, per_tensor=True)
    assert cost(alloc, "wide") > cost(alloc, "narrow")
    assert storage(alloc, {"narrow": same, "wide": wide}) <= budget


def test_per_tensor_not_worse_than_uniform_on_real_tables():
    for scheme, budget in (("tvq", 3.5), ("rtvq", 2.375)):
        tables = real_tables(scheme, 8)
        uni = allocate_bits(tables, budget, num_tasks=8, scheme=scheme)
        per = allocate_bits(tables, budget, num_tasks=8, scheme=scheme, per_tensor=True)
        assert per.objective <= uni.objective and storage(per, tables) <= budget


# --------------------------------------------------------------------------- errors, JSON, wrappers


def test_budget_errors():
    tables = real_tables("tvq", 8)
    with pytest.raises(BudgetError, match=r"below the minimum 1 for tvq"):
        allocate_bits(tables, 0.5, num_tasks=8, scheme="tvq")
    rt = {"a": ErrorTable(10, "rtvq", 8, torch.ones(8, 8, dtype=torch.float64))}
    with pytest.raises(BudgetError, match=r"budget 0.5 bits/param is below the minimum 1.125 for rtvq with 8 tasks; "
                                          r"raise --budget"):
        allocate_bits(rt, 0.5, num_tasks=8, scheme="rtvq")
    with pytest.raises(BudgetError, match="minimum 2"):
        allocate_bits(tables, 1.5, num_tasks=8, scheme="tvq", min_bits=2)
    with pytest.raises(BudgetError):
        allocate_bits(tables, float("nan"), num_tasks=8, scheme="tvq")
    with pytest.raises(BudgetError, match="'zzz'"):
        allocate_bits(tables, 4, num_tasks=8, scheme="tvq", sensitivity={"a": 1, "b": 1, "c": 1, "zzz": 1})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(BudgetError, match="'b'"):
            allocate_bits(tables, 4, num_tasks=8, scheme="tvq", sensitivity={"a": 1, "b": bad, "c": 1})
    with pytest.raises(BudgetError, match="'b'"):
        allocate_bits(tables, 4, num_tasks=8, scheme="tvq", sensitivity={"a": 1, "c": 1})
    with pytest.raises(BudgetError, match="rebuild"):
        allocate_bits(tables, 4, num_tasks=8, scheme="rtvq")
    with pytest.raises(BudgetError):  # fails before building any table
        allocate_from_taus({"k": [torch.zeros(3)]}, 0.5, scheme="tvq")


def test_json_round_trip_and_describe():
    tables = real_tables("rtvq", 8)
    uni = allocate_bits(tables, 2.375, num_tasks=8, scheme="rtvq")
    per = allocate_bits(tables, 2.5, num_tasks=8, scheme="rtvq", per_tensor=True)
    tvq = allocate_bits(real_tables("tvq", 8), 3.7, num_tasks=8, scheme="tvq", per_tensor=True)
    for alloc in (uni, per, tvq):
        back = Allocation.from_json(json.loads(json.dumps(alloc.to_json())))
        assert back == alloc and back.to_json() == alloc.to_json()
    assert re.fullmatch(r"rtvq B\dO\d \([\d.]+ bits/param/task at T=8, budget 2\.375\)", uni.describe())
    assert re.fullmatch(r"rtvq per-tensor, [\d.]+ bits/param/task at T=8 \(budget 2\.5\), base [\d–]+, "
                        r"offsets [\d–]+ bits", per.describe())
    assert re.fullmatch(r"tvq per-tensor, [\d.]+ bits/param/task \(budget 3\.7\), [\d–]+ bits", tvq.describe())
    assert "bits" not in tvq.to_json() or "base_bits" not in tvq.to_json()
    base, off = uni.specs("a", QuantSpec(granularity="channel"))
    assert (base.bits, off.bits, off.granularity) == (uni.base_bits["a"], uni.offset_bits["a"], "channel")


def test_allocate_from_taus():
    taus = {"small": taus_like(3, (16, 16), seed=8), "big": taus_like(3, (32, 32), scale=5.0, seed=9)}
    alloc = allocate_from_taus(taus, 3.0, scheme="tvq", per_tensor=True, max_samples=512)
    assert alloc.num_tasks == 3 and set(alloc.bits) == {"small", "big"}
    assert alloc.bits["big"] >= alloc.bits["small"] and alloc.bits_per_param <= 3.0
    rt = allocate_from_taus(taus, 2.5, scheme="rtvq", spec=QuantSpec(granularity="channel"), error_correction=False)
    assert rt.bits_per_param <= 2.5 and set(rt.base_bits) == {"small", "big"}
