"""Fused CPU kernels for the hot loops of quantization (numba), with torch fallbacks.

Quantizing a task vector with eager torch ops costs ~8 passes over memory (subtract, min/max,
scale, shift, round, clamp, cast, pack); the storage benchmark requires quantization to cost
little more than loading the checkpoints. These kernels fuse the work into two passes:

- :func:`sub_minmax`: ``out = a - b`` plus its min, max and a finiteness flag, in one pass;
- :func:`quantize_pack`: scale, round half-to-even, clamp and bit-pack straight into the output
  bytes, in one pass; :func:`unpack_dequantize` is its inverse;
- ``_sub_minmax_nb`` / ``_qpack_nb`` over a range of ``a - b`` without storing the difference
  serve the store writer's cache-blocked path too (``store.fused_kernels``).

The loops are written so that LLVM vectorises them: they index views from 0, and the min / max /
finiteness reductions are integer ones (an order-preserving integer key of each float, the
largest exponent field), since a float reduction may not be reordered and would run serially.
They produce bit-identical results to the pure torch reference in ``affine`` / ``packing`` (the
tests check this), run on CPU float32 tensors, and fall back to the torch path for other devices
or dtypes, when numba is missing, or when ``TVQ_DISABLE_NUMBA=1``.

The kernels are serial and release the GIL (``nogil``): callers parallelise across tasks with
threads (:func:`parallel_map`), which scales without the per-call barrier of a parallel loop and
degrades gracefully when the machine is busy.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:  # numba is a hard dependency, but keep the package importable without it
    import numba
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None



def numba_enabled() -> bool:
    return numba is not None and os.environ.get("TVQ_DISABLE_NUMBA", "") not in ("1", "true", "yes")


def _usable(*ts: Tensor) -> bool:
    return numba_enabled() and all(
        t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in ts
    )


_QBLOCK = 1024  # codes per block of the packing loop (a multiple of 8; stays in L1)

if numba is not None:

    @intrinsic
    def _f32_bits(typingctx, x):  # pragma: no cover - compiled
        """The bit pattern of a float32 as an int32."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.int32))
        return types.int32(types.float32), codegen

    @intrinsic
    def _bits_f32(typingctx, x):  # pragma: no cover - compiled
        """The float32 of an int32 bit pattern."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.int32), codegen

    @njit(cache=True, inline="always")
    def _order(k):  # pragma: no cover - compiled
        # float32 bits <-> an int32 ordered like the floats (-0.0 < +0.0); its own inverse
        return np.int32(k ^ np.int32(np.int32(k >> np.int32(31)) & np.int32(0x7FFFFFFF)))

    @njit(cache=True, inline="always")
    def _diff(x, y, b, i):  # pragma: no cover - compiled
        # x[i] - y[i], or x[i] when b is None (numba prunes the branch at compile time)
        return x[i] - y[i] if b is not None else x[i]

    @njit(cache=True, nogil=True)
    def _sub_minmax_nb(a, b, out, start, end):  # pragma: no cover - compiled
        # over [start, end): v = a - b (a when b is None), stored in out unless None; min, max
        # and finiteness as integer reductions (order keys, max exponent), which LLVM vectorises
        # (a float min / max / sum reduction it may not reorder, so it would run serially)
        x = a[start:end]
        y = x if b is None else b[start:end]
        o = x if out is None else out[start:end]
        lo = np.int32(0x7FFFFFFF)
        hi = np.int32(-0x80000000)
        ex = np.int32(0)
        for i in range(x.size):
            v = _diff(x, y, b, i)
            if out is not None:
                o[i] = v
            k = _f32_bits(v)
            lo = np.int32(min(lo, _order(k)))
            hi = np.int32(max(hi, _order(k)))
            ex = np.int32(max(ex, np.int32(k & np.int32(0x7F800000))))
        return _bits_f32(_order(lo)), _bits_f32(_order(hi)), ex != np.int32(0x7F800000)

    @njit(cache=True, inline="always")
    def _compress(w, bits):  # pragma: no cover - compiled
        # 8 codes, one per byte of w (code j in byte j) -> 8*bits bits, code j at bit j*bits
        w = (w & np.uint64(0x00FF00FF00FF00FF)) | ((w & np.uint64(0xFF00FF00FF00FF00)) >> np.uint64(8 - bits))
        w = (w & np.uint64(0x0000FFFF0000FFFF)) | ((w & np.uint64(0xFFFF0000FFFF0000)) >> np.uint64(16 - 2 * bits))
        w = (w & np.uint64(0x00000000FFFFFFFF)) | ((w & np.uint64(0xFFFFFFFF00000000)) >> np.uint64(32 - 4 * bits))
        return w

    @njit(cache=True, inline="always")
    def _expand(w, bits):  # pragma: no cover - compiled
        # inverse of _compress: 8*bits packed bits -> one code per byte
        m4 = np.uint64((1 << (4 * bits)) - 1)
        w = (w & m4) | ((w & (m4 << np.uint64(4 * bits))) << np.uint64(32 - 4 * bits))
        m2 = np.uint64((1 << (2 * bits)) - 1)
        m2 = m2 | (m2 << np.uint64(32))
        w = (w & m2) | ((w & (m2 << np.uint64(2 * bits))) << np.uint64(16 - 2 * bits))
        m1 = np.uint64((1 << bits) - 1)
        m1 = m1 | (m1 << np.uint64(16))
        m1 = m1 | (m1 << np.uint64(32))
        w = (w & m1) | ((w & (m1 << np.uint64(bits))) << np.uint64(8 - bits))
        return w

    @njit(cache=True, inline="always")
    def _code(v, sb, zb, levels):  # pragma: no cover - compiled
        return np.uint8(min(max(np.rint(v * sb + zb), np.float32(0.0)), levels))

    @njit(cache=True, inline="always")
    def _xcode(x, y, b, i, sb, zb, levels):  # pragma: no cover - compiled
        return _code(_diff(x, y, b, i), sb, zb, levels)

    @njit(cache=True, inline="always")
    def _pack_words(words, g, bits, out):  # pragma: no cover - compiled
        # g groups of 8 codes (a word each, code j in byte j) -> g * bits bytes; inlined where
        # ``bits`` is a constant, so the byte loop unrolls
        for k in range(g):
            w = _compress(words[k], bits)
            for i in range(bits):
                out[k * bits + i] = np.uint8((w >> np.uint64(8 * i)) & np.uint64(0xFF))

    @njit(cache=True, inline="always")
    def _pack_block(codes, m, bits, out):  # pragma: no cover - compiled
        # codes[:m] (one per byte, m a multiple of 8) packed into out[:m * bits // 8], bits < 8.
        # 1, 2, 4 bits: each output byte from one word of 8 / bits codes, a loop LLVM vectorises
        if bits == 4:  # c0 | c1 << 8  ->  c0 | c1 << 4
            w16 = codes.view(np.uint16)
            for k in range(m // 2):
                w = w16[k]
                out[k] = np.uint8((w | (w >> np.uint16(4))) & np.uint16(0xFF))
        elif bits == 2:  # c0 | c1 << 8 | c2 << 16 | c3 << 24  ->  c0 | c1 << 2 | c2 << 4 | c3 << 6
            w32 = codes.view(np.uint32)
            for k in range(m // 4):
                w = w32[k]
                out[k] = np.uint8((w | (w >> np.uint32(6)) | (w >> np.uint32(12)) | (w >> np.uint32(18))) & np.uint32(0xFF))
        elif bits == 1:  # byte j's low bit to bit 56 + j: the products' bits never overlap
            w64 = codes.view(np.uint64)
            for k in range(m // 8):
                out[k] = np.uint8((w64[k] * np.uint64(0x0102040810204080)) >> np.uint64(56))
        elif bits == 3:
            _pack_words(codes.view(np.uint64), m // 8, 3, out)
        elif bits == 5:
            _pack_words(codes.view(np.uint64), m // 8, 5, out)
        elif bits == 6:
            _pack_words(codes.view(np.uint64), m // 8, 6, out)
        else:
            _pack_words(codes.view(np.uint64), m // 8, 7, out)

    @njit(cache=True, nogil=True)
    def _qpack_nb(a, b, start, end, sb, zb, levels, bits, out):  # pragma: no cover - compiled
        # per tensor: codes of x[start:end] (x = a - b, or a when b is None) quantized and packed
        # into out[0:]; start is a multiple of 8, so the bytes are those of the whole tensor.
        # Codes of a block go to an L1 buffer, then are packed; loops index views from 0 so that
        # LLVM vectorises them.
        x = a[start:end]
        y = x if b is None else b[start:end]
        n = x.size
        main = n // 8 * 8
        if bits == 8:
            for o in range(main):
                out[o] = _xcode(x, y, b, o, sb, zb, levels)
        else:
            codes = np.empty(_QBLOCK, np.uint8)
            for blk in range(0, main, _QBLOCK):
                m = min(_QBLOCK, main - blk)
                xs = x[blk:blk + m]
                ys = xs if b is None else y[blk:blk + m]
                for j in range(m):
                    codes[j] = _xcode(xs, ys, b, j, sb, zb, levels)
                _pack_block(codes, m, bits, out[blk * bits // 8:])
        if main < n:  # the last, partial group of 8 codes: ceil(rest * bits / 8) bytes
            w = np.uint64(0)
            for j in range(n - main):
                w |= np.uint64(_xcode(x, y, b, main + j, sb, zb, levels)) << np.uint64(8 * j)
            w = _compress(w, bits)
            base = main * bits // 8
            for k in range(((n - main) * bits + 7) // 8):
                out[base + k] = np.uint8((w >> np.uint64(8 * k)) & np.uint64(0xFF))

    @njit(cache=True, nogil=True)
    def _quantize_blocks_nb(x, s, z, width, levels, codes):  # pragma: no cover - compiled
        n = x.size
        for blk in range(s.size):
            sb = s[blk]
            zb = z[blk]
            for i in range(blk * width, min(n, (blk + 1) * width)):
                q = np.rint(x[i] * sb + zb)
                codes[i] = np.uint8(min(max(q, np.float32(0.0)), levels))

    @njit(cache=True, nogil=True)
    def _pack_words_nb(words, bits, out):  # pragma: no cover - compiled
        nbytes = out.size
        for g in range(words.size):
            w = _compress(words[g], bits)
            base = g * bits
            for k in range(min(bits, nbytes - base)):
                out[base + k] = np.uint8((w >> np.uint64(8 * k)) & np.uint64(0xFF))

    @njit(cache=True, nogil=True)
    def _unpack1_nb(p, c):  # pragma: no cover - compiled
        for o in range(p.size):
            v = p[o]
            i = 8 * o
            for j in range(8):
                c[i + j] = (v >> np.uint8(j)) & np.uint8(1)

    @njit(cache=True, nogil=True)
    def _unpack2_nb(p, c):  # pragma: no cover - compiled
        for o in range(p.size):
            v = p[o]
            i = 4 * o
            c[i] = v & np.uint8(3)
            c[i + 1] = (v >> np.uint8(2)) & np.uint8(3)
            c[i + 2] = (v >> np.uint8(4)) & np.uint8(3)
            c[i + 3] = v >> np.uint8(6)

    @njit(cache=True, nogil=True)
    def _unpack4_nb(p, c):  # pragma: no cover - compiled
        for o in range(p.size):
            v = p[o]
            c[2 * o] = v & np.uint8(15)
            c[2 * o + 1] = v >> np.uint8(4)

    @njit(cache=True, nogil=True)
    def _unpack_words_nb(packed, bits, words):  # pragma: no cover - compiled
        nbytes = packed.size
        for g in range(words.size):
            base = g * bits
            w = np.uint64(0)
            for k in range(min(bits, nbytes - base)):
                w |= np.uint64(packed[base + k]) << np.uint64(8 * k)
            words[g] = _expand(w, bits)

    def _unpack_nb(packed, bits, codes, words):
        """Unpack ``packed`` into ``codes`` (length a multiple of 8, its uint64 view ``words``)."""
        if bits == 8:
            codes[: packed.size] = packed
        elif bits in (1, 2, 4):
            fn = _unpack1_nb if bits == 1 else _unpack2_nb if bits == 2 else _unpack4_nb
            fn(packed, codes[: packed.size * 8 // bits])
        else:
            _unpack_words_nb(packed, bits, words)

    @njit(cache=True, nogil=True)
    def _dequant_tensor_nb(codes, zb, sb, out):  # pragma: no cover - compiled
        for i in range(out.size):
            out[i] = (np.float32(codes[i]) - zb) * sb

    @njit(cache=True, nogil=True)
    def _dequant_blocks_nb(codes, z, scale, width, out):  # pragma: no cover - compiled
        n = out.size
        for blk in range(z.size):
            zb = z[blk]
            sb = scale[blk]
            for i in range(blk * width, min(n, (blk + 1) * width)):
                out[i] = (np.float32(codes[i]) - zb) * sb


    @njit(cache=True, nogil=True)
    def _histogram_nb(codes, numel, levels):  # pragma: no cover - compiled
        out = np.zeros(levels, np.int64)
        for i in range(numel):
            out[codes[i]] += 1
        return out

    @njit(cache=True, nogil=True)
    def _byte_histogram_nb(p):  # pragma: no cover - compiled
        # four interleaved counters: consecutive equal bytes do not wait on one counter's store
        h = np.zeros((4, 256), np.int64)
        main = p.size // 4 * 4
        for i in range(0, main, 4):
            h[0, p[i]] += 1
            h[1, p[i + 1]] += 1
            h[2, p[i + 2]] += 1
            h[3, p[i + 3]] += 1
        for i in range(main, p.size):
            h[0, p[i]] += 1
        return h.sum(axis=0)


_scratch = threading.local()


def _scratch_codes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-thread uint8 buffer of ``n`` codes rounded up to 8 (and its uint64 view), zero tail."""
    padded = (n + 7) // 8 * 8
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < padded:
        buf = np.zeros(max(padded, 8), np.uint8)
        _scratch.buf = buf
    codes = buf[:padded]
    codes[n:padded] = 0
    return codes, codes.view(np.uint64)


def sub_minmax(a: Tensor, b: Tensor | None, out: Tensor | None = None) -> tuple[Tensor, float, float, bool]:
    """``out = a - b`` (or a copy of ``a``) in float32, with its min, max and whether all are finite."""
    a32 = a if a.dtype == torch.float32 else a.float()
    b32 = None if b is None else (b if b.dtype == torch.float32 else b.float())
    if out is None:
        out = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    if _usable(a32, out, *(() if b32 is None else (b32,))) and a32.numel():
        an = a32.numpy().reshape(-1)  # numpy's reshape: a few microseconds less than torch's, per key
        bn = None if b32 is None else b32.numpy().reshape(-1)
        lo, hi, finite = _sub_minmax_nb(an, bn, out.numpy().reshape(-1), 0, an.size)
        return out, float(lo), float(hi), bool(finite)
    if b32 is None:
        out.copy_(a32)
    else:
        torch.sub(a32, b32, out=out)
    if out.numel() == 0:
        return out, 0.0, 0.0, True
    finite = bool(torch.isfinite(out).all())
    lo, hi = torch.aminmax(out)
    return out, float(lo), float(hi), finite


def quantize_pack(x: Tensor, s: Tensor, z: Tensor, bits: int, out: Tensor) -> bool:
    """Quantize flat ``x`` (blocks of ``x.numel() // s.numel()`` values) and pack into ``out``.

    Returns False (doing nothing) when the fused kernel cannot run; the caller then uses the
    torch reference path.
    """
    if not _usable(x, out, s, z) or x.dtype != torch.float32:
        return False
    n = x.numel()
    width = max(1, n // max(1, s.numel()))
    levels = np.float32((1 << bits) - 1)
    if s.numel() == 1:  # the common case: one fused pass, no codes buffer
        xn = x.reshape(-1).numpy()
        _qpack_nb(xn, None, 0, n, np.float32(s.item()), np.float32(z.item()), levels, bits, out.numpy())
        return True
    codes, words = _scratch_codes(n)
    _quantize_blocks_nb(x.reshape(-1).numpy(), s.float().contiguous().numpy(), z.float().contiguous().numpy(),
                        width, levels, codes)
    codes[n:] = 0
    _pack_words_nb(words, bits, out.numpy())
    return True


def unpack_dequantize(packed: Tensor, z: Tensor, scale: Tensor, bits: int, numel: int, out: Tensor) -> bool:
    """Inverse of :func:`quantize_pack` into float32 ``out``; False when the kernel cannot run."""
    if not _usable(packed, out) or out.dtype != torch.float32 or z.device.type != "cpu":
        return False
    width = max(1, numel // max(1, z.numel()))
    codes, words = _scratch_codes(numel)
    _unpack_nb(packed.numpy(), bits, codes, words)
    o = out.view(-1).numpy()[:numel]
    if z.numel() == 1:
        _dequant_tensor_nb(codes, np.float32(z.item()), np.float32(scale.item()), o)
    else:
        _dequant_blocks_nb(codes, z.float().contiguous().numpy(), scale.float().contiguous().numpy(), width, o)
    return True


_POOL, _POOL_LOCK = None, threading.Lock()


def num_workers() -> int:
    """Threads for :func:`parallel_map`: ``TVQ_NUM_THREADS`` or torch's intra-op thread count."""
    env = os.environ.get("TVQ_NUM_THREADS")
    return max(1, int(env)) if env else max(1, torch.get_num_threads())


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL  # noqa: PLW0603
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="tvq")
        return _POOL


def parallel_map(fn, items):
    """``[fn(x) for x in items]`` on a shared thread pool (the kernels release the GIL)."""
    items, workers = list(items), num_workers()
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(workers).map(fn, items))


def submit(fn, *args) -> Future:
    """``fn(*args)`` queued on the shared pool (first in, first out)."""
    return _pool(num_workers()).submit(fn, *args)


def code_histogram(packed: Tensor, bits: int, numel: int) -> Tensor | None:
    """Counts of each code value (int64, ``2**bits`` entries) of a packed tensor; None without numba."""
    if not _usable(packed):
        return None
    if bits in (1, 2, 4, 8):  # count the bytes, then the codes each byte value holds: no unpacking
        h = _byte_histogram_nb(packed.reshape(-1).numpy())
        per = 8 // bits
        byte = np.arange(256)
        counts = np.zeros(1 << bits, np.int64)
        for j in range(per):
            np.add.at(counts, (byte >> (j * bits)) & ((1 << bits) - 1), h)
        counts[0] -= packed.numel() * per - numel   # the zero padding codes of the last byte
        return torch.from_numpy(counts)
    codes, words = _scratch_codes(numel)
    _unpack_nb(packed.numpy(), bits, codes, words)
    return torch.from_numpy(_histogram_nb(codes, numel, 1 << bits))
