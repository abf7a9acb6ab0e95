"""Merging one key straight from packed per-tensor codes (TVQ stores, CPU, numba).

The general path decodes each of the T task vectors of a key to float32 and combines them with
eager torch ops: T float32 copies of the key in memory and ~10 passes over them for TIES. Here the
codes of all tasks are unpacked a block of elements at a time into an L1-sized buffer and combined
element by element, so a key costs its packed bytes plus one float32 output:

- :func:`sum_packed`: ``sum_t tau_t`` (task arithmetic, weight averaging);
- :func:`ties_packed`: TIES' trim (``|tau_t| < v_t`` -> 0), sign election and disjoint sum or
  mean, also returning the elected signs' sum and whether some entry has a zero elected sum
  while a task is non-zero there (TIES defers such keys: see ``methods/ties.py``).

Each value is ``(code - z_t) * scale_t`` in float32 (RTVQ: plus the shared base's
``(code - z_b) * scale_b``) and the tasks are added in order, exactly as the general path
computes them, so the results are bit-identical (``tests/merging/test_fused_merge.py``).
Blocks run on the shared thread pool of :mod:`~tvq_lightning.quant.kernels` (the kernels release
the GIL).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..quant.kernels import numba, numba_enabled, parallel_map
from ..quant.qtensor import QTensor

BLOCK = 1 << 14          # elements per block: T x BLOCK code bytes stay in L1 / L2


@dataclass
class PackedKey:
    """One key's codes for every task: ``packed`` (T, nbytes) uint8, per-task ``zero`` and ``scale``
    (float32), one code width, ``numel`` values of ``shape``; ``present[t]`` is False for a task that
    stores nothing for the key (its vector is zero). RTVQ: the shared base's codes ``base`` (1, nbytes)
    with ``base_bits``, ``base_zero``, ``base_scale``, added to every present task's value."""

    packed: np.ndarray
    zero: np.ndarray
    scale: np.ndarray
    bits: int
    numel: int
    shape: tuple[int, ...]
    present: np.ndarray
    base: np.ndarray
    base_bits: int = 8
    base_zero: float = 0.0
    base_scale: float = 0.0
    has_base: bool = False


def _per_tensor(q: QTensor) -> bool:
    return q.zero_point.numel() == 1 and q.packed.device.type == "cpu"


def pack_key(qs: list[QTensor | None], shape: tuple[int, ...], base: QTensor | None = None) -> PackedKey | None:
    """The tasks' per-tensor codes of one key side by side (and RTVQ's ``base``); None when the fused
    path does not apply (numba off, another device, per-channel / group codes, mixed widths)."""
    if not numba_enabled():
        return None
    given = [q for q in qs if q is not None]
    if not given or (base is not None and not _per_tensor(base)):
        return None
    bits = given[0].spec.bits
    if any(q.spec.bits != bits or not _per_tensor(q) for q in given):
        return None
    numel = 1
    for d in shape:
        numel *= int(d)
    nbytes = (numel * bits + 7) // 8
    packed = np.zeros((len(qs), nbytes), np.uint8)
    zero = np.zeros(len(qs), np.float32)
    scale = np.zeros(len(qs), np.float32)
    for t, q in enumerate(qs):
        if q is None:
            continue
        if q.packed.numel() < nbytes:
            return None
        packed[t] = q.packed.reshape(-1)[:nbytes].numpy()
        zero[t] = np.float32(q.zero_point.item())
        scale[t] = np.float32(q.scale.item())
    present = np.array([q is not None for q in qs])
    if base is None:
        return PackedKey(packed, zero, scale, bits, numel, tuple(shape), present, np.zeros((1, 1), np.uint8))
    bbytes = (numel * base.spec.bits + 7) // 8
    if base.packed.numel() < bbytes:
        return None
    return PackedKey(packed, zero, scale, bits, numel, tuple(shape), present,
                     base.packed.reshape(1, -1)[:, :bbytes].numpy(), base.spec.bits,
                     float(np.float32(base.zero_point.item())), float(np.float32(base.scale.item())), True)


def pair_counts(offset: QTensor, base: QTensor, numel: int) -> Tensor | None:
    """Counts (int64, ``2**offset_bits * 2**base_bits``) of the (offset code, base code) pairs of the
    first ``numel`` codes, straight from the packed bytes; None without numba."""
    if not numba_enabled():
        return None
    lb = 1 << base.spec.bits
    out = np.zeros((1 << offset.spec.bits) * lb, np.int64)
    _pair_counts_nb(offset.packed.reshape(1, -1).numpy(), offset.spec.bits, base.packed.reshape(1, -1).numpy(),
                    base.spec.bits, numel, lb, out)
    return torch.from_numpy(out)


def _args(pk: PackedKey) -> tuple:
    return (pk.packed, pk.bits, pk.zero, pk.scale, pk.present, pk.base, pk.base_bits, np.float32(pk.base_zero),
            np.float32(pk.base_scale), pk.has_base)


def _blocks(numel: int) -> list[tuple[int, int]]:
    return [(s, min(BLOCK, numel - s)) for s in range(0, numel, BLOCK)]


def sum_packed(pk: PackedKey) -> Tensor:
    """``sum_t tau_t`` of the key, float32 in its shape."""
    out = np.empty(pk.numel, np.float32)
    parallel_map(lambda b: _sum_block(*_args(pk), b[0], b[1], out), _blocks(pk.numel))
    return torch.from_numpy(out).view(pk.shape)


def ties_packed(pk: PackedKey, thresholds, final: bool, fill_sign: float, dis_mean: bool) -> tuple[Tensor, int, bool]:
    """TIES' merge of the key (before scaling): ``(merged, sum of the elected signs, defer)``.

    ``final``: entries with a zero elected sum take ``fill_sign`` (the model's majority sign);
    otherwise ``defer`` reports whether such an entry exists (the merged values are then unused).
    """
    out = np.empty(pk.numel, np.float32)
    thr = np.asarray(thresholds, np.float32)

    def run(b):
        return _ties_block(*_args(pk), thr, b[0], b[1], final, np.float32(fill_sign), dis_mean, out)

    parts = parallel_map(run, _blocks(pk.numel))
    gsum = sum(int(g) for g, _ in parts)
    return torch.from_numpy(out).view(pk.shape), gsum, any(bool(d) for _, d in parts)


if numba is not None:
    from numba import njit

    from ..quant.kernels import _unpack1_nb, _unpack2_nb, _unpack4_nb, _unpack_words_nb

    @njit(cache=True, nogil=True)
    def _unpack_rows(packed, bits, start, n, codes):  # pragma: no cover - compiled
        # codes[t, :n] = the codes start .. start+n of task t (start a multiple of 8)
        b0 = start * bits // 8
        b1 = min(packed.shape[1], ((start + n) * bits + 7) // 8)
        for t in range(packed.shape[0]):
            p = packed[t, b0:b1]
            c = codes[t]
            if bits == 8:
                c[:p.size] = p
            elif bits == 4:
                _unpack4_nb(p, c[:2 * p.size])
            elif bits == 2:
                _unpack2_nb(p, c[:4 * p.size])
            elif bits == 1:
                _unpack1_nb(p, c[:8 * p.size])
            else:
                _unpack_words_nb(p, bits, c.view(np.uint64))

    @njit(cache=True, inline="always")
    def _value(codes, t, i, zero, scale, present, bv, has_base):  # pragma: no cover - compiled
        # task t's decoded value at i: (code - z) * s, plus the shared base's (RTVQ); 0 when absent
        if not present[t]:
            return np.float32(0.0)
        v = (np.float32(codes[t, i]) - zero[t]) * scale[t]
        if has_base:
            v = v + bv[i]
        return v

    @njit(cache=True, nogil=True)
    def _unpack_block(packed, bits, present, base, base_bits, has_base, start, n):  # pragma: no cover - compiled
        width = (n + 7) // 8 * 8 + 8
        codes = np.zeros((packed.shape[0], width), np.uint8)
        _unpack_rows(packed, bits, start, n, codes)
        bcodes = np.zeros((1, width if has_base else 1), np.uint8)
        if has_base:
            _unpack_rows(base, base_bits, start, n, bcodes)
        return codes, bcodes

    @njit(cache=True, nogil=True)
    def _pair_counts_nb(a, abits, b, bbits, numel, lb, out):  # pragma: no cover - compiled
        ca = np.zeros((1, BLOCK + 8), np.uint8)
        cb = np.zeros((1, BLOCK + 8), np.uint8)
        for start in range(0, numel, BLOCK):
            n = min(BLOCK, numel - start)
            _unpack_rows(a, abits, start, n, ca)
            _unpack_rows(b, bbits, start, n, cb)
            x = ca[0]
            y = cb[0]
            for i in range(n):
                out[np.int64(x[i]) * lb + y[i]] += 1

    @njit(cache=True, nogil=True)
    def _base_values(bcodes, bz, bs, has_base, n):  # pragma: no cover - compiled
        # the shared base's decoded values of the block (RTVQ), each computed once for all tasks
        bv = np.zeros(n if has_base else 1, np.float32)
        if has_base:
            b = bcodes[0]
            for i in range(n):
                bv[i] = (np.float32(b[i]) - bz) * bs
        return bv

    @njit(cache=True, nogil=True)
    def _sum_block(packed, bits, zero, scale, present, base, base_bits, bz, bs, has_base, start, n, out):  # pragma: no cover
        # the same float32 operations as decoding each task and summing in task order, one task at a
        # time over the block so the inner loop has no branch and vectorizes
        codes, bcodes = _unpack_block(packed, bits, present, base, base_bits, has_base, start, n)
        bv = _base_values(bcodes, bz, bs, has_base, n)
        o = out[start:start + n]
        zero32 = np.float32(0.0)
        for t in range(packed.shape[0]):
            c = codes[t]
            z = zero[t]
            s = scale[t]
            if not present[t]:
                if t == 0:
                    o[:] = zero32
                else:
                    for i in range(n):
                        o[i] += zero32
            elif has_base:
                if t == 0:
                    for i in range(n):
                        o[i] = (np.float32(c[i]) - z) * s + bv[i]
                else:
                    for i in range(n):
                        o[i] += (np.float32(c[i]) - z) * s + bv[i]
            elif t == 0:
                for i in range(n):
                    o[i] = (np.float32(c[i]) - z) * s
            else:
                for i in range(n):
                    o[i] += (np.float32(c[i]) - z) * s

    @njit(cache=True, inline="always")
    def _trimmed(c, i, z, s, bv, has_base, th):  # pragma: no cover - compiled
        # one task's decoded value at i, zero where its magnitude is under the task's threshold
        v = (np.float32(c[i]) - z) * s
        if has_base:
            v = v + bv[i]
        return np.float32(0.0) if abs(v) < th else v

    @njit(cache=True, nogil=True)
    def _ties_block(packed, bits, zero, scale, present, base, base_bits, bz, bs, has_base, thr, start, n, final,
                    fill, dis_mean, out):  # pragma: no cover - compiled
        # two sweeps of the tasks over the block, each inner loop over elements and free of branches:
        # the trimmed values summed in task order (the elected sign), then the agreeing ones summed in
        # task order; the same float32 operations as the element-by-element definition
        T = packed.shape[0]
        codes, bcodes = _unpack_block(packed, bits, present, base, base_bits, has_base, start, n)
        bv = _base_values(bcodes, bz, bs, has_base, n)
        zero32 = np.float32(0.0)
        total = np.zeros(n, np.float32)
        nonzero = np.zeros(n, np.bool_)
        for t in range(T):
            if not present[t]:
                continue  # its values are +0: neither the sums nor the elected sign change
            c = codes[t]
            z, s, th = zero[t], scale[t], thr[t]
            for i in range(n):
                v = _trimmed(c, i, z, s, bv, has_base, th)
                total[i] += v
                nonzero[i] |= v != zero32
        gsum = 0
        defer = False
        g = np.empty(n, np.float32)
        for i in range(n):
            x = total[i]
            gi = np.float32(1.0) if x > zero32 else (np.float32(-1.0) if x < zero32 else zero32)
            if not final:
                gsum += int(gi)
                if gi == zero32 and nonzero[i]:
                    defer = True
            elif gi == zero32:
                gi = fill
            g[i] = gi
        acc = np.zeros(n, np.float32)
        count = np.zeros(n, np.int32)
        for t in range(T):
            if not present[t]:
                continue
            c = codes[t]
            z, s, th = zero[t], scale[t], thr[t]
            for i in range(n):
                v = _trimmed(c, i, z, s, bv, has_base, th)
                take = v != zero32 and g[i] != zero32 and (v > zero32) == (g[i] > zero32)
                acc[i] += v if take else zero32
                count[i] += 1 if take else 0
        o = out[start:start + n]
        if dis_mean:
            for i in range(n):
                o[i] = acc[i] / np.float32(max(count[i], 1))
        else:
            o[:] = acc
        return gsum, defer
