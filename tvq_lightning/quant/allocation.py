"""Bit allocation under a memory budget, for the schemes that have one (TVQ, RTVQ, BitDelta).

The budget ``B`` is in bits per quantized parameter per task, averaged over the quantized keys
weighted by their element counts ``n_k``. TVQ with ``b_k`` bits on key ``k`` stores
``sum_k n_k b_k <= B sum_k n_k`` bits per task; RTVQ with base bits ``bb_k`` and offset bits ``bo_k``
stores ``sum_k n_k (bo_k + bb_k / T) <= B sum_k n_k`` (the base is shared by the ``T`` tasks).
Widths are integers in 1..8; the few bytes of scale / zero-point per tensor are not counted.
The objective is the sensitivity-weighted reconstruction error ``sum_k w_k E_k`` with
``E_k = sum_t ||tau_tk - tau_hat_tk||^2``; ``w_k`` defaults to 1 and can be a diagonal-Fisher
estimate (mean squared gradient of key ``k``).

Stage 1, :func:`~.error_tables.key_error_table` (``quant/error_tables.py``), runs once per key
while the store writer streams over the keys; the scheme object chooses the candidates it measures.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import BudgetError
from .config import QuantSpec, check_bits
from .error_tables import ErrorTable, key_error_table

__all__ = ["Allocation", "ErrorTable", "allocate_bits", "allocate_from_taus", "key_error_table"]


def _scheme(name: str):
    from .schemes import get_scheme

    return get_scheme(name)


@dataclass(frozen=True)
class Allocation:
    """Chosen widths per key: the scheme's allocation fields (TVQ, BitDelta: ``bits``; RTVQ:
    ``base_bits`` and ``offset_bits``).

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
        """``spec`` with this key's width (one allocation field), or one spec per field (RTVQ: base, offset)."""
        specs = tuple(spec.with_bits(getattr(self, f)[key]) for f in self.fields)
        return specs[0] if len(specs) == 1 else specs

    @property
    def fields(self) -> tuple[str, ...]:
        """The width fields this allocation fills (the scheme's ``allocation_fields``)."""
        return _scheme(self.scheme).allocation_fields

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; ``from_json`` restores an equal object."""
        names = self.fields
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
        impl = _scheme(self.scheme)
        at, bpp, budget = f" at T={self.num_tasks}" * impl.shared_file, self.bits_per_param, self.budget
        if not (self.bits or self.base_bits):
            return f"{self.scheme} (no quantized keys, budget {budget!r})"
        span = {n: sorted(set(getattr(self, n).values())) for n in ("bits", "base_bits", "offset_bits")}
        if not self.per_tensor:
            label = impl.describe_widths({n: str(v[0]) for n, v in span.items() if v}, False)
            return f"{self.scheme} {label} ({bpp:.4g} bits/param/task{at}, budget {budget!r})"
        rng = {n: f"{v[0]}" if len(v) == 1 else f"{v[0]}\u2013{v[-1]}" for n, v in span.items() if v}
        widths = impl.describe_widths(rng, True)
        return f"{self.scheme} per-tensor, {bpp:.4g} bits/param/task{at} (budget {budget!r}), {widths}"


def _candidates(scheme: str, min_bits: int, max_bits: int, num_tasks: int):
    """The scheme's (settings, units, D) for widths in ``min_bits..max_bits`` (``Scheme.allocation_candidates``)."""
    impl = _scheme(scheme)
    if not impl.allocation_fields:
        from .schemes import list_schemes

        able = [n for n in list_schemes() if _scheme(n).allocation_fields]
        raise ValueError(f"scheme={scheme!r} has no bit allocation: choose one of {', '.join(able)}")
    settings, units, D = impl.allocation_candidates(range(min_bits, max_bits + 1), num_tasks)
    return settings, np.array(units, dtype=np.int64), D


def _check_budget(budget: float, scheme: str, num_tasks: int, min_bits: int, max_bits: int) -> float:
    _scheme(scheme)  # an unknown name: an error naming the choices
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise BudgetError(f"num_tasks={num_tasks!r} must be a positive integer")
    check_bits(min_bits, "min_bits")
    check_bits(max_bits, "max_bits")
    if min_bits > max_bits:
        raise BudgetError(f"min_bits={min_bits} exceeds max_bits={max_bits}; lower min_bits or raise max_bits")
    settings, units, D = _candidates(scheme, min_bits, max_bits, num_tasks)
    if not settings:
        raise BudgetError(f"{scheme} has no width in {min_bits}..{max_bits}; widen min_bits..max_bits")
    need = float(units.min()) / D
    if not math.isfinite(budget) or budget < need - 1e-12:
        raise BudgetError(f"budget {budget:g} bits/param is below the minimum {need:g} for {scheme} with "
                          f"{num_tasks} tasks; raise --budget")
    return float(budget)


def allocate_bits(tables: Mapping[str, ErrorTable], budget: float, *, num_tasks: int, scheme: str,
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
    T = num_tasks
    settings, units, D = _candidates(scheme, min_bits, max_bits, T)  # cheapest first; unit: 1/D bit
    fields = _scheme(scheme).allocation_fields
    errs = np.stack([tables[k].errors.double().numpy() for k in keys]) if keys else np.zeros((0,) + (8,) * len(fields))
    E = errs[(slice(None), *[[st[j] - 1 for st in settings] for j in range(len(fields))])]
    n = np.array([tables[k].numel for k in keys], dtype=np.int64)
    cap = math.floor(budget * D * int(n.sum()) * (1 + 1e-12) + 1e-9)  # total storage units
    wE = np.where(np.isfinite(E), w[:, None] * np.nan_to_num(E, posinf=0.0), np.inf)

    def build(choice: list[int], per: bool) -> Allocation:
        N = int(n.sum())
        bpp = int(sum(n[i] * units[c] for i, c in enumerate(choice))) / D / N if N else 0.0
        obj = float(sum(wE[i, c] for i, c in enumerate(choice)))
        widths = [{k: settings[c][j] for k, c in zip(keys, choice)} for j in range(len(settings[0]))]
        named = dict(zip(fields, widths))
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


def allocate_from_taus(taus_by_key: Mapping[str, Sequence[Tensor]], budget: float, *, scheme: str,
                       num_tasks: int | None = None, per_tensor: bool = False,
                       sensitivity: Mapping[str, float] | None = None, min_bits: int = 1, max_bits: int = 8,
                       **table_kwargs: Any) -> Allocation:
    """Error tables for every key (``table_kwargs`` go to :func:`key_error_table`), then :func:`allocate_bits`."""
    T = num_tasks if num_tasks is not None else (len(next(iter(taus_by_key.values()))) if taus_by_key else 1)
    _check_budget(budget, scheme, T, min_bits, max_bits)  # fail before the expensive pass
    tables = {k: key_error_table(v, scheme, **table_kwargs) for k, v in taus_by_key.items()}
    return allocate_bits(tables, budget, num_tasks=T, scheme=scheme, per_tensor=per_tensor,
                         sensitivity=sensitivity, min_bits=min_bits, max_bits=max_bits)
