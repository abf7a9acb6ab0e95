"""Stage 1 of bit allocation: measured error tables of one key (``quant/allocation.py`` is stage 2).

Stage 1, :func:`key_error_table`, runs once per key while the store writer streams over the
keys. Every candidate is measured with the real quantizer: TVQ ``E(b)`` for ``b = 1..8``, RTVQ
``E(bb, bo)`` for all 64 pairs, offsets taken against the quantized base (error correction) or
the full-precision mean. Ranges, which set the step, always come from the full tensor; the
squared error is evaluated on an evenly strided subsample of at most ``max_samples`` elements
(seeded random start) and scaled by ``numel / samples``. With error correction the offset range
depends on the base width; it is found exactly in one pass: the sum over ``bb`` of the base
codes is monotone in ``beta``, so it labels at most 503 bins inside which every base code is
constant, and per-bin min / max of each ``tau_t`` give the range of ``tau_t - x_hat(beta)`` for
all eight base widths at once. Single-pass numba kernels serve per-tensor granularity (tensors
of 32k+ elements); torch code serves the rest and machines without numba (``TVQ_DISABLE_NUMBA=1``).

The scheme object chooses the measurement (``Scheme.error_table``): per-width affine codes of
the task vectors (:func:`affine_errors`, TVQ) or every (base, offset) pair (:func:`base_offset_errors`,
RTVQ); this module prepares the sample they share (:class:`Sample`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .affine import _rows, affine_params, block_ranges, dequantize_rows, quantize_rows
from .config import MAX_BITS, QuantSpec

try:  # numba is a dependency; keep the module importable without it
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None

BITS = tuple(range(1, MAX_BITS + 1))
LEVELS = torch.tensor([float((1 << b) - 1) for b in BITS])
_FAST_MIN = 1 << 15  # smaller tensors take the torch path

if njit is not None:  # serial kernels: no thread pool to fight torch's; parallelise across keys instead

    @njit(cache=True, nogil=True)
    def _bins_nb(beta, s, z, lev, rep):  # pragma: no cover - compiled
        out = np.zeros(beta.size, np.int32)
        for k in range(s.size):  # same float ops as affine.quantize_rows
            sk, zk, top = s[k], z[k], lev[k]
            for i in range(beta.size):
                out[i] += np.int32(min(max(np.rint(beta[i] * sk + zk), np.float32(0.0)), top))
        for i in range(beta.size):
            rep[out[i]] = beta[i]  # any member: every code is constant inside a bin
        return out

    @njit(cache=True, nogil=True)
    def _ranges_nb(x, sub, bins, nbins):  # pragma: no cover - compiled
        lo = np.full(nbins, np.inf, np.float32)
        hi = np.full(nbins, -np.inf, np.float32)
        for i in range(x.size):
            v = x[i] - sub[i] if sub.size else x[i]
            k = bins[i] if bins.size else 0
            if v < lo[k]:
                lo[k] = v
            if v > hi[k]:
                hi[k] = v
        return lo, hi

    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def _errors_nb(tau, ref, base, s, z, c, lev, out):  # pragma: no cover - compiled
        T, m = tau.shape
        for b in range(base.shape[0]):
            r = b if ref.shape[0] > 1 else 0
            for t in range(T):
                for o in range(lev.size):
                    si, zi, ci, top = s[b, o, t], z[b, o, t], c[b, o, t], lev[o]
                    acc = 0.0
                    for i in range(m):
                        x = tau[t, i]
                        q = min(max(np.rint((x - ref[r, i]) * si + zi), np.float32(0.0)), top)
                        e = x - ((q - zi) * ci + base[b, i])
                        acc += e * e
                    out[b, o, t] = acc


def _fast(spec: QuantSpec, x: Tensor) -> bool:
    """Use the numba kernels: per-tensor CPU data (small tensors are as fast in torch)."""
    return (njit is not None and os.environ.get("TVQ_DISABLE_NUMBA", "") not in ("1", "true", "yes")
            and spec.granularity == "tensor" and x.device.type == "cpu" and x.numel() >= _FAST_MIN)


def _params(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(s, z, scale) for every width 1..8 stacked on a new leading dim, plus which widths are valid."""
    valid = [not (spec.symmetric and b < 2) for b in BITS]  # symmetric needs 2 bits
    p = [affine_params(lo, hi, spec.with_bits(b if ok else 2)) for b, ok in zip(BITS, valid)]
    s, z, sc = (torch.stack(v) for v in zip(*p))
    return s, z, sc, torch.tensor(valid)


def _ranges(xs: list[Tensor], sub: Tensor | None, spec: QuantSpec, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-block (min, max) of ``x - sub`` for each task: (T, blocks) each."""
    out = []
    for x in xs:
        if _fast(spec, x):
            empty = np.empty(0, np.float32)
            out.append(tuple(map(torch.from_numpy, _ranges_nb(
                x.numpy(), empty if sub is None else sub.numpy(), np.empty(0, np.int32), 1))))
        else:
            out.append(block_ranges(_rows((x if sub is None else x - sub).view(shape), spec)))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def _offset_ranges(xs: list[Tensor], beta: Tensor, bp: tuple[Tensor, ...], spec: QuantSpec,
                   shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-block range of ``tau_t - x_hat_bb(beta)`` for every base width: (8, T, blocks) each."""
    s, z, sc, _ = bp
    if not _fast(spec, beta):
        rows = _rows(beta.view(shape), spec)
        los, his = [], []
        for i, b in enumerate(BITS):
            xb = dequantize_rows(quantize_rows(rows, s[i], z[i], b), z[i], sc[i]).reshape(-1)[: beta.numel()]
            lo, hi = _ranges(xs, xb, spec, shape)
            los.append(lo)
            his.append(hi)
        return torch.stack(los), torch.stack(his)
    lev = LEVELS.numpy().astype(np.float32)
    rep = np.full(int(lev.sum()) + 1, np.nan, np.float32)
    bins = _bins_nb(beta.numpy(), s[:, 0].contiguous().numpy(), z[:, 0].contiguous().numpy(), lev, rep)
    used = torch.from_numpy(rep).isfinite()
    reps = torch.from_numpy(rep)[used].view(1, -1)
    levels = torch.stack([dequantize_rows(quantize_rows(reps, s[i], z[i], b), z[i], sc[i])[0]
                          for i, b in enumerate(BITS)])  # (8, bins): x_hat of each bin per width
    los, his = [], []
    for x in xs:
        lo, hi = (torch.from_numpy(r)[used] for r in _ranges_nb(x.numpy(), np.empty(0, np.float32), bins, rep.size))
        los.append((lo - levels).amin(1, keepdim=True))  # fl(v - L) is monotone in v: exact
        his.append((hi - levels).amax(1, keepdim=True))
    return torch.stack(los, 1), torch.stack(his, 1)


def _errors(tau: Tensor, ref: Tensor, base: Tensor, s: Tensor, z: Tensor, c: Tensor, blk: Tensor,
            fast: bool) -> Tensor:
    """Squared error of ``tau - (base + x_hat(tau - ref))`` per (base row, width, task): float64."""
    nb, T = base.shape[0], tau.shape[0]
    if fast:
        out = np.zeros((nb, len(BITS), T), np.float64)
        _errors_nb(tau.numpy(), ref.contiguous().numpy(), base.contiguous().numpy(), s[..., 0].contiguous().numpy(),
                   z[..., 0].contiguous().numpy(), c[..., 0].contiguous().numpy(), LEVELS.numpy(), out)
        return torch.from_numpy(out)
    out = torch.empty(nb, len(BITS), T, dtype=torch.float64)
    for b in range(nb):
        d = tau - ref[b if ref.shape[0] > 1 else 0]
        for o in range(len(BITS)):
            S, Z, C = (p[b, o][:, blk] for p in (s, z, c))
            q = (d * S).add_(Z).round_().clamp_(0.0, float(LEVELS[o]))
            e = tau - q.sub_(Z).mul_(C).add_(base[b])
            out[b, o] = (e * e).sum(1, dtype=torch.float64)
    return out


def _mean(xs: list[Tensor]) -> Tensor:
    """``beta`` exactly as ``schemes.rtvq_base`` computes it: summed in task order, then divided."""
    if len(xs) == 1:
        return xs[0]
    acc = xs[0].clone()
    for x in xs[1:]:
        acc.add_(x)
    return acc.div_(len(xs))


@dataclass(frozen=True, eq=False)
class ErrorTable:
    """Measured squared error of one key, summed over tasks, for every candidate width.

    Indexed by ``width - 1`` per allocation field of the scheme (``Scheme.allocation_fields``):
    ``errors[b - 1]`` (TVQ, shape [8]) or ``errors[bb - 1, bo - 1]`` (RTVQ, shape [8, 8]), float64;
    ``inf`` marks widths the spec (or the scheme) cannot use (1 bit when symmetric).
    """

    numel: int
    scheme: str
    num_tasks: int
    errors: Tensor


@dataclass(frozen=True, eq=False)
class Sample:
    """One key's task vectors as the error measurements see them (see the module docstring).

    ``xs``: the full flattened float32 vectors (CPU); ``tau``: their subsample, (T, m); ``idx``:
    the sampled positions; ``blk``: each sampled position's block; ``scale_up``: ``n / m``.
    """

    xs: list[Tensor]
    shape: tuple[int, ...]
    spec: QuantSpec
    error_correction: bool
    idx: Tensor
    blk: Tensor
    tau: Tensor
    fast: bool
    scale_up: float


def key_error_table(taus: Sequence[Tensor], scheme: str, *, spec: QuantSpec = QuantSpec(),
                    error_correction: bool = True, max_samples: int = 1 << 16, seed: int = 0) -> ErrorTable:
    """Error of every candidate width of ``scheme`` (TVQ: 1..8; RTVQ: every (base, offset) pair)
    for one key's ``T`` task vectors."""
    from .schemes import get_scheme, list_schemes

    impl = get_scheme(scheme)
    if not impl.allocation_fields:
        able = [n for n in list_schemes() if get_scheme(n).allocation_fields]
        raise ValueError(f"scheme={scheme!r} has no bit allocation: choose one of {', '.join(able)}")
    if len(taus) == 0 or any(t.shape != taus[0].shape for t in taus):
        raise ValueError("key_error_table needs one or more task vectors of the same shape")
    shape, T = tuple(taus[0].shape), len(taus)
    xs = [t.detach().cpu().float().contiguous().view(-1) for t in taus]  # statistics run on the CPU
    n = xs[0].numel()
    if n == 0:
        return ErrorTable(0, scheme, T, torch.zeros((len(BITS),) * len(impl.allocation_fields), dtype=torch.float64))
    m = min(n, max(1, int(max_samples)))
    if m < n:  # evenly strided subsample, seeded start
        u = float(torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        idx = ((torch.arange(m, dtype=torch.float64) + u) * (n / m)).long().clamp_(max=n - 1)
    else:
        idx = torch.arange(n)
    width = spec.group_size if spec.granularity == "group" else (
        n // shape[0] if spec.granularity == "channel" and shape else n)  # elements per (scale, zero)
    tau = torch.stack([x[idx] for x in xs]) if m < n else torch.stack(xs)
    sample = Sample(xs, shape, spec, error_correction, idx, idx // width, tau, _fast(spec, xs[0]), n / m)
    return ErrorTable(n, scheme, T, impl.error_table(sample))


def affine_errors(sm: Sample) -> Tensor:
    """TVQ: error of affine codes of each ``tau_t`` at every width 1..8, shape [8]."""
    s, z, c, valid = (p.unsqueeze(0) for p in _params(*_ranges(sm.xs, None, sm.spec, sm.shape), sm.spec))
    ref = base = torch.zeros(1, sm.tau.shape[1])
    return _finish(_errors(sm.tau, ref, base, s, z, c, sm.blk, sm.fast), sm, valid.view(1, -1))[0]


def base_offset_errors(sm: Sample) -> Tensor:
    """RTVQ: error of every (base width, offset width) pair, shape [8, 8]; offsets against the
    quantized base (error correction) or the fp32 mean ``beta``."""
    xs, spec, shape, blk = sm.xs, sm.spec, sm.shape, sm.blk
    beta = _mean(xs)
    bp = _params(*(r[0] for r in _ranges([beta], None, spec, shape)), spec)  # (8, blocks) each
    beta_s = beta[sm.idx]
    q = (beta_s * bp[0][:, blk]).add_(bp[1][:, blk]).round_().clamp_(min=0.0)  # quantize_rows' ops
    base = torch.minimum(q, LEVELS.view(-1, 1)).sub_(bp[1][:, blk]).mul_(bp[2][:, blk])  # (8, m)
    if sm.error_correction:
        lo, hi = _offset_ranges(xs, beta, bp, spec, shape)
        ref = base
    else:
        lo, hi = (r.expand(len(BITS), -1, -1) for r in _ranges(xs, beta, spec, shape))
        ref = beta_s.view(1, -1)
    *sz, ovalid = _params(lo, hi, spec)
    s, z, c = (p.transpose(0, 1) for p in sz)  # (bb, bo, T, blocks)
    valid = bp[3].view(-1, 1) & ovalid.view(1, -1)
    return _finish(_errors(sm.tau, ref, base, s, z, c, blk, sm.fast), sm, valid)


def _finish(err: Tensor, sm: Sample, valid: Tensor) -> Tensor:
    err = err.sum(-1) * sm.scale_up
    return torch.where(valid, err, torch.full_like(err, math.inf))
