"""The compiled passes of the fused path (store/fused_kernels.py) against whole-tensor references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvq_lightning.quant import kernels
from tvq_lightning.quant.affine import affine_params
from tvq_lightning.quant.config import QuantSpec

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")

if kernels.numba is not None:
    from tvq_lightning.store.fused_kernels import codes, ranges, task_vectors


@pytest.mark.parametrize("bits", range(1, 9))
def test_parts_of_a_difference_match_the_whole_tensor(bits):
    """Ranges and packed codes of ``a_t - b`` for several tasks, taken piecewise (cuts at
    multiples of 8, small cache blocks), equal those of each whole difference."""
    for n in (1, 7, 8, 9, 17, 64, 1001, 4099):
        tasks = tuple(torch.randn(n).numpy() for _ in range(3))
        b = torch.randn(n).numpy()
        diffs = [torch.from_numpy(a - b) for a in tasks]
        cuts = sorted({0, n, *(c for c in (8, 16, n // 2 // 8 * 8, n // 8 * 8) if c < n)})
        pieces = [ranges(tasks, b, c0, c1, 24) for c0, c1 in zip(cuts[:-1], cuts[1:])]
        for t, d in enumerate(diffs):
            lo, hi = min(p[0][t] for p in pieces), max(p[1][t] for p in pieces)
            assert (lo, hi) == (float(d.min()), float(d.max())) and all(p[2][t] for p in pieces)
        lo = torch.stack([d.min() for d in diffs])
        hi = torch.stack([d.max() for d in diffs])
        s, z, _ = affine_params(lo, hi, QuantSpec(bits))
        whole = []
        for t, d in enumerate(diffs):
            w = torch.empty(math.ceil(n * bits / 8), dtype=torch.uint8)
            assert kernels.quantize_pack(d, s[t:t + 1], z[t:t + 1], bits, w)
            whole.append(w)
        active = np.array([2, 0], np.int64)  # any subset of the tasks, in any order
        row = n + 8
        out = np.empty(2 * row, np.uint8)
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            out[:] = 0xAB
            nb = codes(tasks, b, c0, c1, 16, s.numpy(), z.numpy(), bits, active, out, row)
            for i, t in enumerate(active):
                got = torch.from_numpy(out[i * row:i * row + nb].copy())
                assert torch.equal(got, whole[t][c0 * bits // 8:c0 * bits // 8 + nb]), (n, c0, t)
                assert (out[i * row + nb:(i + 1) * row] == 0xAB).all(), "wrote past the row's bytes"
    tasks[1][3] = float("nan")
    assert ranges(tasks, b, 0, n, 64)[2] == [True, False, True]


def test_task_vectors_match_sub_minmax():
    """Every task's vector of a key in one call: the rows and ranges of ``sub_minmax``, one task at a time."""
    for n in (1, 7, 100):
        tasks = tuple(torch.randn(n).numpy() for _ in range(3))
        tasks[1][:] = 0.0
        b = np.zeros(n, np.float32) if n == 1 else torch.randn(n).numpy()
        out = np.empty((3, n), np.float32)
        lo, hi, finite = task_vectors(tasks, b, out)
        for t, a in enumerate(tasks):
            want, wlo, whi, wfin = kernels.sub_minmax(torch.from_numpy(a), torch.from_numpy(b))
            assert torch.equal(torch.from_numpy(out[t]).view(torch.int32), want.view(torch.int32))
            assert (lo[t], hi[t], finite[t]) == (wlo, whi, wfin)
    with pytest.raises(ValueError):
        task_vectors(tasks, b, np.empty((2, n), np.float32))


def test_fused_kernels_refuse_bad_ranges():
    """The compiled loops do not check bounds, so the wrappers do."""
    a, out, sz = np.zeros(16, np.float32), np.empty(32, np.uint8), np.zeros(1, np.float32)
    one = np.zeros(1, np.int64)
    with pytest.raises(IndexError):
        ranges((a,), np.zeros(8, np.float32), 0, 16, 8)
    with pytest.raises(IndexError):
        codes((a,), a, 8, 24, 8, sz, sz, 4, one, out, 16)
    with pytest.raises(ValueError):
        codes((a,), a, 4, 16, 8, sz, sz, 4, one, out, 16)
    with pytest.raises(ValueError):
        codes((a,), a, 0, 16, 8, sz, sz, 8, one, out, 15)
