"""The two compiled passes of :mod:`.fused` over one part of a key, for every task in one call.

``tasks`` is a tuple of the tasks' flat float32 arrays (one numba ``UniTuple`` type per number
of tasks), ``b`` theta_0's. Both passes walk ``[start, end)`` in cache blocks of ``chunk``
elements, every task's block in turn against the same theta_0 block, which is therefore read
from memory once for all tasks. A call runs without the GIL from start to end, so the pool's
threads do not wait between blocks for Python work elsewhere (small keys, reservations).

- :func:`ranges`: min, max and finiteness of ``tasks[t] - b`` per task;
- :func:`codes`: ``tasks[t] - b`` quantized per tensor and packed, per task, into rows of a
  staging buffer (the same bytes as :func:`~..quant.kernels.quantize_pack` of the whole tensor);
- :func:`task_vectors`: ``tasks[t] - b`` of a small key into the rows of a matrix, with ranges.
"""
from __future__ import annotations

import numpy as np

from ..quant.kernels import numba

if numba is not None:
    from numba import njit

    from ..quant.kernels import _qpack_nb, _sub_minmax_nb

    @njit(cache=True, nogil=True)
    def _ranges_nb(tasks, b, start, end, chunk, lo, hi, finite):  # pragma: no cover - compiled
        for c0 in range(start, end, chunk):
            c1 = min(c0 + chunk, end)
            for t in range(len(tasks)):
                tlo, thi, tfin = _sub_minmax_nb(tasks[t], b, None, c0, c1)
                if tlo < lo[t]:  # as Python's min / max: ties keep the earlier value
                    lo[t] = tlo
                if thi > hi[t]:
                    hi[t] = thi
                finite[t] = finite[t] and tfin

    @njit(cache=True, nogil=True)
    def _codes_nb(tasks, b, start, end, chunk, s, z, levels, bits, active, out, row):  # pragma: no cover - compiled
        pos = 0  # bytes of each row so far; every block but the last is whole groups of 8 codes
        for c0 in range(start, end, chunk):
            c1 = min(c0 + chunk, end)
            for i in range(active.size):
                t = active[i]
                _qpack_nb(tasks[t], b, c0, c1, s[t], z[t], levels, bits, out[i * row + pos:])
            pos += (c1 - c0) * bits // 8

    @njit(cache=True, nogil=True)
    def _task_vectors_nb(tasks, b, out, lo, hi, finite):  # pragma: no cover - compiled
        for t in range(len(tasks)):
            lo[t], hi[t], finite[t] = _sub_minmax_nb(tasks[t], b, out[t], 0, b.size)


def _check(tasks: tuple, b: np.ndarray, start: int, end: int) -> None:
    """The compiled loops do not check bounds: a bad range would read outside the arrays."""
    if not (0 <= start <= end <= b.size and all(a.size >= end for a in tasks)):
        raise IndexError(f"range [{start}, {end}) outside arrays of {b.size} / {[a.size for a in tasks]} elements")


def ranges(tasks: tuple, b: np.ndarray, start: int, end: int, chunk: int) -> tuple[list, list, list]:
    """Per task: min and max of ``(tasks[t] - b)[start:end]`` and whether all of it is finite."""
    _check(tasks, b, start, end)
    n = len(tasks)
    lo, hi, finite = np.full(n, np.inf, np.float32), np.full(n, -np.inf, np.float32), np.ones(n, np.bool_)
    _ranges_nb(tasks, b, start, end, chunk, lo, hi, finite)
    return lo.tolist(), hi.tolist(), finite.tolist()


def task_vectors(tasks: tuple, b: np.ndarray, out: np.ndarray) -> tuple[list, list, list]:
    """``out[t] = tasks[t] - b`` (``out`` of shape ``(len(tasks), b.size)``) with each row's min, max
    and finiteness, as :func:`~..quant.kernels.sub_minmax` gives them."""
    _check(tasks, b, 0, b.size)
    if out.shape != (len(tasks), b.size):
        raise ValueError(f"task_vectors: out has shape {out.shape}, not {(len(tasks), b.size)}")
    n = len(tasks)
    lo, hi, finite = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.bool_)
    _task_vectors_nb(tasks, b, out, lo, hi, finite)
    return lo.tolist(), hi.tolist(), finite.tolist()


def codes(tasks: tuple, b: np.ndarray, start: int, end: int, chunk: int, s: np.ndarray, z: np.ndarray, bits: int,
          active: np.ndarray, out: np.ndarray, row: int) -> int:
    """Packed per-tensor codes of ``(tasks[t] - b)[start:end]`` for ``t = active[i]`` into
    ``out[i * row:]``; returns the bytes per task.

    ``start`` must be a multiple of 8, so the bytes are those from ``start * bits // 8`` on of
    the whole tensor's packed codes; ``s[t]`` and ``z[t]`` are task ``t``'s float32 inverse step
    and zero-point.
    """
    _check(tasks, b, start, end)
    nbytes = ((end - start) * bits + 7) // 8
    if start % 8 or nbytes > row or out.size < active.size * row:
        raise ValueError(f"codes: start {start} is not a multiple of 8 or {nbytes} bytes per task do not fit")
    _codes_nb(tasks, b, start, end, chunk, s, z, np.float32((1 << bits) - 1), bits, active, out, row)
    return nbytes
