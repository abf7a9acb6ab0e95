"""The fused merge kernels (merging/fused.py) give exactly the general path's results: task
arithmetic, weight averaging and TIES (both merges, a deferred key, the final fill sign), from TVQ
codes of every width and RTVQ base + offsets, with a task whose vector is zero, through the
streaming engine and on crafted keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tvq_lightning.merging import engine
from tvq_lightning.merging.base import KeyInput
from tvq_lightning.merging.engine import merge_state_dict
from tvq_lightning.merging.fused import BLOCK, PackedKey, pack_key, sum_packed, ties_packed
from tvq_lightning.merging.methods.ties import Ties, TiesConfig
from tvq_lightning.quant import kernels
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.packing import pack_codes
from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.testing import synthetic_finetunes, tiny_pretrained

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")


def _general(monkeypatch):
    monkeypatch.setattr(engine, "pack_key", lambda *a, **k: None)


@pytest.mark.parametrize("cfg", [StoreConfig("tvq", bits=b) for b in (2, 3, 4, 8)]
                         + [StoreConfig("rtvq", base_bits=3, offset_bits=2), StoreConfig("rtvq", base_bits=4, offset_bits=1)],
                         ids=lambda c: c.label)
def test_engine_merges_equal_the_general_path(cfg, tmp_path, monkeypatch):
    pre = {k: v.detach().clone() for k, v in tiny_pretrained(3, width=32, depth=2).state_dict().items()}
    fts = synthetic_finetunes(pre, 4, seed=5)
    fts[2] = {k: v.clone() for k, v in pre.items()}          # a task that changed nothing
    store = tmp_path / "store"
    quantize_to_store(pre, {f"t{t}": ft for t, ft in enumerate(fts)}, store, cfg, progress=False)
    cases = [("task_arithmetic", {"scaling": 0.4}), ("weight_averaging", {}), ("ties", {"k": 0.3}),
             ("ties", {"k": 0.5, "merge": "dis-mean"}), ("lines", {"base": "ties"})]
    used = []
    monkeypatch.setattr(engine, "pack_key", lambda *a: used.append(pack_key(*a)) or used[-1])
    fused = {i: merge_state_dict(store, pre, m, **o) for i, (m, o) in enumerate(cases)}
    assert sum(pk is not None for pk in used) >= 4 * len(cases)     # the quantized keys took the fused path
    _general(monkeypatch)
    for i, (m, o) in enumerate(cases):
        ref = merge_state_dict(store, pre, m, **o)
        for k in ref:
            assert torch.equal(fused[i][k], ref[k]), (m, o, k)


def _crafted(T: int, n: int, bits: int, seed: int, cancel: bool) -> tuple[PackedKey, list[torch.Tensor]]:
    """Random per-tensor codes; with ``cancel`` task 1 is task 0 negated exactly (zero elected sums)."""
    g = torch.Generator().manual_seed(seed)
    levels = 1 << bits
    qs, taus = [], []
    for t in range(T):
        codes = torch.randint(0, levels, (n,), generator=g, dtype=torch.uint8)
        z, s = levels // 2, float(torch.rand(1, generator=g)) * 0.01 + 1e-3
        if cancel and t == 1:
            codes, s = (2 * (levels // 2) - qs[0][0].long()).clamp(0, levels - 1).to(torch.uint8), qs[0][2]
        qs.append((codes, z, s))
    out = []
    for codes, z, s in qs:
        q = QTensor.from_state(pack_codes(codes, bits), torch.tensor([z], dtype=torch.int32),
                               torch.tensor([s], dtype=torch.float32), (n,), QuantSpec(bits=bits))
        out.append(q)
        taus.append(q.dequantize())
    return pack_key(out, (n,)), taus


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [7, BLOCK + 13])
def test_kernels_equal_the_torch_merges(bits, n):
    T = 5
    pk, taus = _crafted(T, n, bits, seed=bits * 100 + n, cancel=True)
    ref_sum = taus[0].clone()
    for t in taus[1:]:
        ref_sum.add_(t)
    assert torch.equal(sum_packed(pk), ref_sum)
    for merge in ("dis-sum", "dis-mean"):
        ties = Ties(TiesConfig(scaling=1.0, k=0.6, merge=merge))
        ties.thresholds = [float(t.abs().quantile(0.3)) for t in taus]
        general = ties.merge_key(KeyInput("w", torch.zeros(n), [t.clone() for t in taus], [str(i) for i in range(T)]))
        sign_total = ties._sign_total
        out, gsum, defer = ties_packed(pk, ties.thresholds, False, 0.0, merge == "dis-mean")
        assert gsum == sign_total and defer == (general is None)
        if general is not None:
            assert torch.equal(out, general)
        for fill in (1.0, -1.0):
            ties._sign_total = fill
            final = ties.merge_key(KeyInput("w", torch.zeros(n), [t.clone() for t in taus], [str(i) for i in range(T)]),
                                   final=True)
            assert torch.equal(ties_packed(pk, ties.thresholds, True, fill, merge == "dis-mean")[0], final)


def test_cancelling_tasks_defer_the_key():
    pk, taus = _crafted(3, 64, 4, seed=1, cancel=True)
    _, _, defer = ties_packed(pk, [0.0, 0.0, 1e9], False, 0.0, False)   # task 2 trimmed away entirely
    assert defer


def test_pack_key_declines_what_it_cannot_fuse():
    q4 = QTensor.quantize(torch.randn(16), QuantSpec(bits=4))
    q2 = QTensor.quantize(torch.randn(16), QuantSpec(bits=2))
    qc = QTensor.quantize(torch.randn(4, 4), QuantSpec(bits=4, granularity="channel"))
    assert pack_key([q4, q2], (16,)) is None          # mixed widths
    assert pack_key([qc, qc], (4, 4)) is None          # per-channel codes
    assert pack_key([None, None], (16,)) is None       # nothing stored
    pk = pack_key([q4, None], (16,))
    assert pk.scale[1] == 0 and np.all(pk.packed[1] == 0)
    assert torch.equal(sum_packed(pk), q4.dequantize())


@pytest.mark.parametrize("use_numba", [True, False])
def test_rtvq_joint_histogram_is_the_decoded_values(use_numba, monkeypatch):
    from tvq_lightning.merging import histogram
    from tvq_lightning.quant.schemes.rtvq import rtvq_quantize

    if not use_numba:
        monkeypatch.setenv("TVQ_DISABLE_NUMBA", "1")
    taus = [torch.randn(1001, generator=torch.Generator().manual_seed(s)) * 0.01 for s in range(3)]
    key = rtvq_quantize(taus, QuantSpec(bits=3), QuantSpec(bits=2))
    for t in range(3):
        values, counts = histogram.joint_level_histogram(key.offsets[t], key.base)
        decoded = key.offsets[t].dequantize() + key.base.dequantize()
        expect = torch.bincount(torch.searchsorted(values.unique(), decoded.abs()), minlength=values.unique().numel())
        got = torch.zeros(values.unique().numel(), dtype=torch.int64).index_add_(
            0, torch.searchsorted(values.unique(), values), counts)
        assert torch.isin(decoded.abs(), values).all() and torch.equal(got, expect)
