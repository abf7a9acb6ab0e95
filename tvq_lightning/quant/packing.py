"""Exact bit packing: ``n`` codes of ``b`` bits take ``ceil(n * b / 8)`` bytes.

Layout (little-endian bit stream): code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least
significant bit first; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Trailing bits of the
last byte are zero. This is the on-disk layout of every quantized tensor in a store.

Implementation: codes are grouped 8 at a time (8 codes = ``b`` bytes for every ``b``); the codes
at position ``i`` of every group form a strided column, and each column is shifted and OR-ed into
at most two byte columns. All work is uint8 element-wise ops, chunked to stay in cache.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import check_bits

_CHUNK_GROUPS = 1 << 16  # groups of 8 codes per chunk


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def _plan(bits: int) -> list[tuple[int, int, int, int]]:
    """For each code position i in a group of 8: (byte, left shift, spill byte or -1, right shift)."""
    plan = []
    for i in range(8):
        pos = i * bits
        byte, off = divmod(pos, 8)
        spill = byte + 1 if off + bits > 8 else -1
        plan.append((byte, off, spill, 8 - off))
    return plan


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2**bits, any shape) into a 1-D uint8 tensor of exact size."""
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone() if flat.data_ptr() == codes.data_ptr() else flat
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    n_groups = groups.shape[0]
    out = torch.zeros((n_groups, bits), dtype=torch.uint8, device=codes.device)
    plan = _plan(bits)
    for g0 in range(0, n_groups, _CHUNK_GROUPS):
        g1 = min(g0 + _CHUNK_GROUPS, n_groups)
        src, dst = groups[g0:g1], out[g0:g1]
        for i, (byte, off, spill, rshift) in enumerate(plan):
            col = src[:, i]
            dst[:, byte] |= col << off if off else col
            if spill >= 0:
                dst[:, spill] |= col >> rshift
    return out.view(-1)[: packed_nbytes(n, bits)]


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: a 1-D uint8 tensor of ``numel`` codes."""
    check_bits(bits)
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"packed buffer has {packed.numel()} bytes, expected {expected} for {numel} codes of {bits} bits")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat
    n_groups = (numel + 7) // 8
    full = n_groups * bits
    if full != flat.numel():
        flat = torch.cat([flat, flat.new_zeros(full - flat.numel())])
    src_all = flat.view(n_groups, bits)
    out = torch.empty((n_groups, 8), dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    plan = _plan(bits)
    for g0 in range(0, n_groups, _CHUNK_GROUPS):
        g1 = min(g0 + _CHUNK_GROUPS, n_groups)
        src, dst = src_all[g0:g1], out[g0:g1]
        for i, (byte, off, spill, rshift) in enumerate(plan):
            col = src[:, byte] >> off if off else src[:, byte].clone()
            if spill >= 0:
                col |= src[:, spill] << rshift
            col &= mask
            dst[:, i] = col
    return out.view(-1)[:numel]
