"""The asymmetric min-max (and symmetric absmax) affine quantizer: pure tensor functions.

Per tensor (the paper's setting)::

    lo, hi = x.min(), x.max()
    s  = (2^b - 1) / (hi - lo)          # inverse step
    z  = -round(s * lo)                 # integer zero-point
    q  = clamp(round(s * x + z), 0, 2^b - 1)
    x_hat = (q - z) * step              # step = 1 / s, stored as ``scale``

``round`` is round-half-to-even (``torch.round``). A constant tensor ``c`` is represented exactly
(one level: ``q = 0``, ``z = -sign(c)``, ``scale = |c|``), where the paper's code divides by zero.
Per-channel and group-wise variants compute one (scale, zero-point) per row / group.

Large tensors are processed in cache-sized chunks so that the four element-wise passes of the
quantizer hit the cache instead of memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import QuantSpec

CHUNK = 1 << 18  # elements per chunk in the streaming loops (1 MiB of fp32)
_F32_MAX = torch.finfo(torch.float32).max
_F32_SAFE = _F32_MAX * (1 - 2.0 ** -20)  # largest reconstruction kept clear of float32 rounding up to inf
_S_CAP = 2.0 ** 126  # inverse step of blocks too narrow for float32's (1 / 2^126 is exact)


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _rows(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``x`` as (n_blocks, block) where each row shares one (scale, zero-point)."""
    flat = x.reshape(-1)
    if spec.granularity == "tensor" or flat.numel() == 0:
        return flat.view(1, -1)
    if spec.granularity == "channel":
        rows = x.shape[0] if x.dim() > 0 else 1
        return flat.view(rows, -1)
    g = spec.group_size
    pad = (-flat.numel()) % g
    if pad:  # pad the last group with its own last value so min/max are unchanged
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, g)


def _params64(lo64: Tensor, hi64: Tensor, const: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(s, z, scale) in float64 for the blocks' ranges; see :func:`affine_params`."""
    one = torch.ones_like(lo64)
    if spec.symmetric:
        half = (1 << (spec.bits - 1)) - 1
        amax = torch.where(const, one, torch.maximum(lo64.abs(), hi64.abs()))
        scale = amax / half
        s = half / amax
        z = torch.full_like(lo64, float(1 << (spec.bits - 1)))
    else:
        span = torch.where(const, one, hi64 - lo64)
        scale = span / _levels(spec.bits)
        s = _levels(spec.bits) / span
        z = -torch.round(s * lo64)
    return s, z, scale


def affine_params(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse step ``s``, zero-point ``z`` and ``scale`` (= step) from per-block ranges.

    Computed in float64 then rounded to float32, so the zero-point is an exact integer and the
    float32 ``scale`` is the correctly rounded step. A constant block ``c`` (``lo == hi``) gets
    ``s = 0`` and ``scale = |c|`` (1 for 0): every code is then ``clamp(z)``, and ``z`` is chosen
    as -1 (c > 0), 2^b (c < 0) or 0 (c = 0) so that ``(q - z) * scale == c`` exactly — also for
    subnormal ``c``, whose inverse would overflow.

    At float32's limits (never for real weights) zero stays exact and nothing becomes inf or NaN,
    while the error bound gives way: a block within a step of float32's max has its range shrunk
    until its largest reconstruction ``amax + scale`` fits (values beyond take the end codes), and a
    block narrower than float32's inverse step allows (about 1e-36) gets ``s = 2^126``,
    ``scale = 2^-126``. Returns (s, z, scale), all float32.
    """
    lo64, hi64 = lo.double(), hi.double()
    const = hi64 == lo64
    s, z, scale = _params64(lo64, hi64, const, spec)
    amax = torch.maximum(lo64.abs(), hi64.abs())
    over = ~const & (amax + scale > _F32_SAFE)
    if bool(over.any()):
        f = torch.where(over, _F32_SAFE / (amax + scale), torch.ones_like(amax))
        s, z, scale = _params64(lo64 * f, hi64 * f, const, spec)
    tiny = ~const & (s > _F32_MAX)
    if bool(tiny.any()):
        s = torch.where(tiny, torch.full_like(s, _S_CAP), s)
        scale = torch.where(tiny, torch.full_like(scale, 1.0 / _S_CAP), scale)
        if not spec.symmetric:
            z = torch.where(tiny, -torch.round(s * lo64), z)
    one = torch.ones_like(lo64)
    const_z = torch.where(lo64 > 0, -one, torch.where(lo64 < 0, torch.full_like(lo64, float(1 << spec.bits)), 0 * one))
    s = torch.where(const, torch.zeros_like(s), s)
    z = torch.where(const, const_z, z)
    scale = torch.where(const, torch.where(lo64 == 0, one, lo64.abs()), scale)
    return s.float(), z.float(), scale.float()


def block_ranges(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (min, max) in one pass."""
    lo, hi = torch.aminmax(rows, dim=1)
    return lo, hi


def quantize_rows(rows: Tensor, s: Tensor, z: Tensor, bits: int, out: Tensor | None = None) -> Tensor:
    """Codes ``clamp(round(s * x + z), 0, 2^b - 1)`` as uint8, chunked along the flat index."""
    levels = float(_levels(bits))
    n_rows, width = rows.shape
    if out is None:
        out = torch.empty(rows.shape, dtype=torch.uint8, device=rows.device)
    if n_rows == 1:  # per tensor: chunk the single row so every pass stays in cache
        s0, z0 = s.view(1, 1), z.view(1, 1)
        for start in range(0, width, CHUNK):
            end = min(start + CHUNK, width)
            buf = rows[:, start:end] * s0
            buf.add_(z0).round_().clamp_(0.0, levels)
            out[:, start:end].copy_(buf)
        return out
    step = max(1, CHUNK // max(width, 1))
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        buf = rows[start:end] * s[start:end, None]
        buf.add_(z[start:end, None]).round_().clamp_(0.0, levels)
        out[start:end].copy_(buf)
    return out


def dequantize_rows(codes: Tensor, z: Tensor, scale: Tensor, out: Tensor | None = None, dtype=torch.float32) -> Tensor:
    """``(q - z) * scale`` per row, written into ``out`` (float) if given."""
    n_rows, width = codes.shape
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if n_rows == 1:
        z0, sc0 = z.view(1, 1).to(dtype), scale.view(1, 1).to(dtype)
        for start in range(0, width, CHUNK):
            end = min(start + CHUNK, width)
            o = out[:, start:end]
            o.copy_(codes[:, start:end])
            o.sub_(z0).mul_(sc0)
        return out
    step = max(1, CHUNK // max(width, 1))
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        o = out[start:end]
        o.copy_(codes[start:end])
        o.sub_(z[start:end, None].to(dtype)).mul_(scale[start:end, None].to(dtype))
    return out


def quantize_affine(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` to codes.

    Returns ``(codes, zero_point, scale)``: ``codes`` is uint8 with the layout of ``_rows`` (for
    group-wise, padded to a whole number of groups), ``zero_point`` and ``scale`` are float32 with
    one entry per block (1 for per-tensor).
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_affine expects a floating tensor, got {x.dtype}")
    rows = _rows(x.float() if x.dtype != torch.float32 else x, spec)
    if rows.numel() == 0:
        return torch.empty(rows.shape, dtype=torch.uint8), torch.zeros(rows.shape[0]), torch.ones(rows.shape[0])
    lo, hi = block_ranges(rows)
    s, z, scale = affine_params(lo, hi, spec)
    codes = quantize_rows(rows, s, z, spec.bits)
    return codes, z, scale


def dequantize_affine(codes: Tensor, zero_point: Tensor, scale: Tensor, shape: tuple[int, ...] | torch.Size,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_affine`: ``(q - z) * scale`` reshaped to ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    rows = codes.view(zero_point.numel(), -1) if codes.dim() != 2 else codes
    out = dequantize_rows(rows, zero_point.float(), scale.float(), dtype=dtype)
    return out.reshape(-1)[:numel].view(tuple(shape))


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize (x_hat), same shape and dtype as ``x``."""
    codes, z, scale = quantize_affine(x, spec)
    return dequantize_affine(codes, z, scale, x.shape, dtype=torch.float32).to(x.dtype)


def error_bound(x: Tensor, spec: QuantSpec) -> float:
    """The worst-case absolute error of per-tensor quantization: half a step."""
    lo, hi = float(x.min()), float(x.max())
    if spec.symmetric:
        return max(abs(lo), abs(hi)) / ((1 << (spec.bits - 1)) - 1) / 2
    return (hi - lo) / (2 * _levels(spec.bits))
