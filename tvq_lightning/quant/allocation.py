"""Bit allocation for TVQ / RTVQ under a memory budget.

The budget ``B`` is in bits per quantized parameter per task, averaged over the quantized keys
weighted by their element counts ``n_k``. TVQ with ``b_k`` bits on key ``k`` stores
``sum_k n_k b_k <= B sum_k n_k`` bits per task; RTVQ with base bits ``bb_k`` and offset bits ``bo_k``
stores ``sum_k n_k (bo_k + bb_k / T) <= B sum_k n_k`` (the base is shared by the ``T`` tasks).
Widths are integers in 1..8; the few bytes of scale / zero-point per tensor are not counted.
The objective is the sensitivity-weighted reconstruction error ``sum_k w_k E_k`` with
``E_k = sum_t ||tau_tk - tau_hat_tk||^2``; ``w_k`` defaults to 1 and can be a diagonal-Fisher
estimate (mean squared gradient of key ``k``).

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

Stage 2, :func:`allocate_bits`. Uniform (default): every feasible store-wide choice (``b``, or
``(bb, bo)``) is enumerated and the lowest objective wins, ties going to fewer bits. Per tensor
(marginal analysis, the greedy form of the Lagrangian relaxation): every key starts at the
cheapest setting, then the upgrade with the largest weighted-error decrease per extra stored
bit is applied, repeatedly. A key's upgrades include every more expensive setting, not only
one more bit, so non-convex error curves are handled. When a key's best upgrade no longer fits,
its best upgrade that still fits takes its place, which spends the leftover budget; the loop
ends when nothing fits. The result never exceeds the budget, and it is compared with the best
uniform choice, which is returned instead when it is better.
"""
from __future__ import annotations

import heapq
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import BudgetError
from .affine import _rows, affine_params, block_ranges, dequantize_rows, quantize_rows
from .config import MAX_BITS, QuantSpec, check_bits

try:  # numba is a dependency; keep the module importable without it
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None

Scheme = Literal["tvq", "rtvq"]
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

    ``errors[b - 1]`` (TVQ, shape [8]) or ``errors[bb - 1, bo - 1]`` (RTVQ, shape [8, 8]), float64;
    ``inf`` marks widths the spec cannot use (1 bit when symmetric).
    """

    numel: int
    scheme: str
    num_tasks: int
    errors: Tensor


def key_error_table(taus: Sequence[Tensor], scheme: Scheme, *, spec: QuantSpec = QuantSpec(),
                    error_correction: bool = True, max_samples: int = 1 << 16, seed: int = 0) -> ErrorTable:
    """Error of every TVQ width / RTVQ (base, offset) pair for one key's ``T`` task vectors."""
    if scheme not in ("tvq", "rtvq"):
        raise ValueError(f"scheme={scheme!r} is unknown: choose 'tvq' or 'rtvq'")
    if len(taus) == 0 or any(t.shape != taus[0].shape for t in taus):
        raise ValueError("key_error_table needs one or more task vectors of the same shape")
    shape, T = tuple(taus[0].shape), len(taus)
    xs = [t.detach().cpu().float().contiguous().view(-1) for t in taus]  # statistics run on the CPU
    n = xs[0].numel()
    if n == 0:
        return ErrorTable(0, scheme, T, torch.zeros((8,) if scheme == "tvq" else (8, 8), dtype=torch.float64))
    m = min(n, max(1, int(max_samples)))
    if m < n:  # evenly strided subsample, seeded start
        u = float(torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        idx = ((torch.arange(m, dtype=torch.float64) + u) * (n / m)).long().clamp_(max=n - 1)
    else:
        idx = torch.arange(n)
    width = spec.group_size if spec.granularity == "group" else (
        n // shape[0] if spec.granularity == "channel" and shape else n)  # elements per (scale, zero)
    blk = idx // width
    tau = torch.stack([x[idx] for x in xs]) if m < n else torch.stack(xs)
    fast = _fast(spec, xs[0])
    if scheme == "tvq":
        s, z, c, valid = (p.unsqueeze(0) for p in _params(*_ranges(xs, None, spec, shape), spec))
        ref = base = torch.zeros(1, m)
        valid = valid.view(1, -1)
    else:
        beta = _mean(xs)
        bp = _params(*(r[0] for r in _ranges([beta], None, spec, shape)), spec)  # (8, blocks) each
        beta_s = beta[idx]
        q = (beta_s * bp[0][:, blk]).add_(bp[1][:, blk]).round_().clamp_(min=0.0)  # quantize_rows' ops
        base = torch.minimum(q, LEVELS.view(-1, 1)).sub_(bp[1][:, blk]).mul_(bp[2][:, blk])  # (8, m)
        if error_correction:
            lo, hi = _offset_ranges(xs, beta, bp, spec, shape)
            ref = base
        else:
            lo, hi = (r.expand(len(BITS), -1, -1) for r in _ranges(xs, beta, spec, shape))
            ref = beta_s.view(1, -1)
        *sz, ovalid = _params(lo, hi, spec)
        s, z, c = (p.transpose(0, 1) for p in sz)  # (bb, bo, T, blocks)
        valid = bp[3].view(-1, 1) & ovalid.view(1, -1)
    err = _errors(tau, ref, base, s, z, c, blk, fast).sum(-1) * (n / m)
    err = torch.where(valid, err, torch.full_like(err, math.inf))
    return ErrorTable(n, scheme, T, err[0] if scheme == "tvq" else err)


@dataclass(frozen=True)
class Allocation:
    """Chosen widths per key. TVQ fills ``bits``; RTVQ fills ``base_bits`` and ``offset_bits``.

    ``bits_per_param`` is the achieved storage in bits per quantized parameter per task and
    ``objective`` the sensitivity-weighted error ``sum_k w_k E_k`` it was chosen for.
    """

    scheme: str
    budget: float
    num_tasks: int
    per_tensor: bool
    bits_per_param: float
    objective: float
    bits: dict[str, int] = field(default_factory=dict)
    base_bits: dict[str, int] = field(default_factory=dict)
    offset_bits: dict[str, int] = field(default_factory=dict)

    def specs(self, key: str, spec: QuantSpec = QuantSpec()) -> QuantSpec | tuple[QuantSpec, QuantSpec]:
        """``spec`` with this key's width (TVQ), or its (base, offset) specs (RTVQ)."""
        if self.scheme == "tvq":
            return spec.with_bits(self.bits[key])
        return spec.with_bits(self.base_bits[key]), spec.with_bits(self.offset_bits[key])

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; ``from_json`` restores an equal object."""
        names = ("bits",) if self.scheme == "tvq" else ("base_bits", "offset_bits")
        d = {k: getattr(self, k) for k in ("scheme", "budget", "num_tasks", "per_tensor", "bits_per_param", "objective")}
        return {**d, **{k: dict(getattr(self, k)) for k in names}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Allocation":
        d = dict(data)
        for k in ("bits", "base_bits", "offset_bits"):
            d[k] = {str(key): int(v) for key, v in d.get(k, {}).items()}
        return cls(**d)

    def describe(self) -> str:
        """One line, e.g. ``rtvq B3O2 (2.375 bits/param/task at T=8, budget 2.5)``."""
        at, bpp, budget = f" at T={self.num_tasks}" * (self.scheme == "rtvq"), self.bits_per_param, self.budget
        if not (self.bits or self.base_bits):
            return f"{self.scheme} (no quantized keys, budget {budget!r})"
        span = {n: sorted(set(getattr(self, n).values())) for n in ("bits", "base_bits", "offset_bits")}
        if not self.per_tensor:
            label = f"INT{span['bits'][0]}" if self.scheme == "tvq" else \
                f"B{span['base_bits'][0]}O{span['offset_bits'][0]}"
            return f"{self.scheme} {label} ({bpp:.4g} bits/param/task{at}, budget {budget!r})"
        rng = {n: f"{v[0]}" if len(v) == 1 else f"{v[0]}\u2013{v[-1]}" for n, v in span.items() if v}
        widths = f"{rng['bits']} bits" if self.scheme == "tvq" else \
            f"base {rng['base_bits']}, offsets {rng['offset_bits']} bits"
        return f"{self.scheme} per-tensor, {bpp:.4g} bits/param/task{at} (budget {budget!r}), {widths}"


def _check_budget(budget: float, scheme: str, num_tasks: int, min_bits: int, max_bits: int) -> float:
    if scheme not in ("tvq", "rtvq"):
        raise ValueError(f"scheme={scheme!r} is unknown: choose 'tvq' or 'rtvq'")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise BudgetError(f"num_tasks={num_tasks!r} must be a positive integer")
    check_bits(min_bits, "min_bits")
    check_bits(max_bits, "max_bits")
    if min_bits > max_bits:
        raise BudgetError(f"min_bits={min_bits} exceeds max_bits={max_bits}; lower min_bits or raise max_bits")
    need = min_bits if scheme == "tvq" else min_bits + min_bits / num_tasks
    if not math.isfinite(budget) or budget < need - 1e-12:
        raise BudgetError(f"budget {budget:g} bits/param is below the minimum {need:g} for {scheme} with "
                          f"{num_tasks} tasks; raise --budget")
    return float(budget)


def allocate_bits(tables: Mapping[str, ErrorTable], budget: float, *, num_tasks: int, scheme: Scheme,
                  per_tensor: bool = False, sensitivity: Mapping[str, float] | None = None,
                  min_bits: int = 1, max_bits: int = 8) -> Allocation:
    """Choose widths minimising ``sum_k w_k E_k`` within ``budget`` bits/param/task (module doc)."""
    budget = _check_budget(budget, scheme, num_tasks, min_bits, max_bits)
    keys = list(tables)
    for k in keys:
        if tables[k].scheme != scheme or tables[k].num_tasks != num_tasks:
            raise BudgetError(f"error table of {k!r} is for {tables[k].scheme} with {tables[k].num_tasks} tasks, "
                              f"not {scheme} with {num_tasks}; rebuild the tables")
    for k, v in (sensitivity or {}).items():
        if k not in tables:
            raise BudgetError(f"sensitivity names key {k!r}, which is not quantized; drop it")
        if not math.isfinite(float(v)) or float(v) < 0:
            raise BudgetError(f"sensitivity of {k!r} is {v!r}; weights must be finite and >= 0")
    for k in keys if sensitivity is not None else ():
        if k not in sensitivity:
            raise BudgetError(f"sensitivity has no weight for key {k!r}; give every quantized key one")
    w = np.array([1.0 if sensitivity is None else float(sensitivity[k]) for k in keys])
    rng, T, D = range(min_bits, max_bits + 1), num_tasks, (1 if scheme == "tvq" else num_tasks)  # unit: 1/D bit
    settings = [(b,) for b in rng] if scheme == "tvq" else sorted(
        ((bb, bo) for bb in rng for bo in rng), key=lambda p: (T * p[1] + p[0], p[1]))  # cheapest first
    units = np.array([st[0] if scheme == "tvq" else T * st[1] + st[0] for st in settings], dtype=np.int64)
    errs = np.stack([tables[k].errors.double().numpy() for k in keys]) if keys else np.zeros((0, 8, 8))
    E = errs[:, [st[0] - 1 for st in settings]] if scheme == "tvq" else \
        errs[:, [st[0] - 1 for st in settings], [st[1] - 1 for st in settings]]
    n = np.array([tables[k].numel for k in keys], dtype=np.int64)
    cap = math.floor(budget * D * int(n.sum()) * (1 + 1e-12) + 1e-9)  # total storage units
    wE = np.where(np.isfinite(E), w[:, None] * np.nan_to_num(E, posinf=0.0), np.inf)

    def build(choice: list[int], per: bool) -> Allocation:
        N = int(n.sum())
        bpp = int(sum(n[i] * units[c] for i, c in enumerate(choice))) / D / N if N else 0.0
        obj = float(sum(wE[i, c] for i, c in enumerate(choice)))
        widths = [{k: settings[c][j] for k, c in zip(keys, choice)} for j in range(len(settings[0]))]
        named = dict(zip(("bits",) if scheme == "tvq" else ("base_bits", "offset_bits"), widths))
        return Allocation(scheme, budget, T, per, bpp, obj, **named)

    # uniform: enumerate, cheapest first so that ties go to fewer bits
    total = wE.sum(0) if keys else np.zeros(len(settings))
    best = None
    for c in range(len(settings)):
        if units[c] <= budget * D * (1 + 1e-12) + 1e-9 and np.isfinite(total[c]):
            if best is None or total[c] < total[best]:
                best = c
    if best is None:
        raise BudgetError(f"no {scheme} width in {min_bits}..{max_bits} fits budget {budget:g} for every key; "
                          f"raise --budget")
    uniform = build([best] * len(keys), per_tensor)
    if not per_tensor or not keys:
        return uniform
    # per tensor: marginal analysis with a lazy max-heap of each key's best upgrade ratio
    state = [min(np.flatnonzero(np.isfinite(wE[i])), key=lambda c: (units[c], wE[i, c])) for i in range(len(keys))]
    used = int((n * units[state]).sum())
    version = [0] * len(keys)
    heap: list[tuple[float, int, int, int]] = []

    def push(i: int) -> None:
        cur = state[i]
        extra = n[i] * (units - units[cur])
        gain = wE[i, cur] - wE[i]
        ok = (extra > 0) & (gain > 0) & (used + extra <= cap) & np.isfinite(wE[i])
        if ok.any():
            ratio = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
            c = int(np.argmax(ratio))  # first maximum: cheapest among equal ratios
            heapq.heappush(heap, (-float(ratio[c]), i, version[i], c))

    for i in range(len(keys)):
        push(i)
    while heap:
        _, i, ver, c = heapq.heappop(heap)
        if ver != version[i]:
            continue
        extra = int(n[i] * (units[c] - units[state[i]]))
        if used + extra <= cap:
            state[i], used, version[i] = c, used + extra, version[i] + 1
        push(i)  # after a step its next upgrade; when it did not fit, its best upgrade that fits
    greedy = build(state, True)
    return greedy if greedy.objective <= uniform.objective else uniform


def allocate_from_taus(taus_by_key: Mapping[str, Sequence[Tensor]], budget: float, *, scheme: Scheme,
                       num_tasks: int | None = None, per_tensor: bool = False,
                       sensitivity: Mapping[str, float] | None = None, min_bits: int = 1, max_bits: int = 8,
                       **table_kwargs: Any) -> Allocation:
    """Error tables for every key (``table_kwargs`` go to :func:`key_error_table`), then :func:`allocate_bits`."""
    T = num_tasks if num_tasks is not None else (len(next(iter(taus_by_key.values()))) if taus_by_key else 1)
    _check_budget(budget, scheme, T, min_bits, max_bits)  # fail before the expensive pass
    tables = {k: key_error_table(v, scheme, **table_kwargs) for k, v in taus_by_key.items()}
    return allocate_bits(tables, budget, num_tasks=T, scheme=scheme, per_tensor=per_tensor,
                         sensitivity=sensitivity, min_bits=min_bits, max_bits=max_bits)
