"""Exact bit packing (``packing.py``): sizes, round trips and the documented bit layout."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq_lightning.errors import QuantConfigError
from tvq_lightning.quant.packing import pack_codes, packed_nbytes, unpack_codes

BITS = list(range(1, 9))


def rand_codes(n: int, bits: int, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=gen)


def ref_pack(codes: list[int], bits: int) -> bytes:
    """Slow reference: code i at stream bits [i*b, (i+1)*b), LSB first; bit j -> byte j//8, bit j%8."""
    stream = []
    for c in codes:
        assert 0 <= c < (1 << bits)
        stream.extend((c >> k) & 1 for k in range(bits))
    stream.extend([0] * ((-len(stream)) % 8))  # trailing bits of the last byte are zero
    return bytes(sum(stream[8 * i + m] << m for m in range(8)) for i in range(len(stream) // 8))


def ref_unpack(data: bytes, bits: int, n: int) -> list[int]:
    stream = [(byte >> m) & 1 for byte in data for m in range(8)]
    return [sum(stream[i * bits + k] << k for k in range(bits)) for i in range(n)]


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_all_small_lengths(bits):
    for n in range(0, 71):
        codes = rand_codes(n, bits)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
        out = unpack_codes(packed, bits, n)
        assert out.dtype == torch.uint8 and out.shape == (n,)
        assert torch.equal(out, codes), n


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_large(bits):
    # more than two of pack_codes' chunks (65536 groups of 8 codes) and not a multiple of 8
    n = 2 * 65536 * 8 + 12345
    codes = rand_codes(n, bits)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_layout_matches_bit_string_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 64, 65, 101, 333):
        codes = rand_codes(n, bits, gen)
        packed = pack_codes(codes, bits)
        expected = ref_pack(codes.tolist(), bits)
        assert bytes(packed.tolist()) == expected, n
        assert unpack_codes(torch.tensor(list(expected), dtype=torch.uint8), bits, n).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", BITS)
def test_layout_extremes(bits):
    """All-ones codes fill exactly n*b low bits of the stream; all-max-but-one alternates."""
    L = (1 << bits) - 1
    for n in (1, 3, 8, 13):
        packed = pack_codes(torch.full((n,), L, dtype=torch.uint8), bits)
        value = int.from_bytes(bytes(packed.tolist()), "little")
        assert value == (1 << (n * bits)) - 1
        zeros = pack_codes(torch.zeros(n, dtype=torch.uint8), bits)
        assert int(zeros.sum()) == 0
    # a single code at position i lands at stream bits [i*b, (i+1)*b)
    for i in range(17):
        codes = torch.zeros(17, dtype=torch.uint8)
        codes[i] = L
        value = int.from_bytes(bytes(pack_codes(codes, bits).tolist()), "little")
        assert value == L << (i * bits)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_hypothesis_layout(bits, data):
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=90))
    packed = pack_codes(torch.tensor(codes, dtype=torch.uint8), bits)
    assert bytes(packed.tolist()) == ref_pack(codes, bits)
    assert ref_unpack(bytes(packed.tolist()), bits, len(codes)) == codes
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", BITS)
def test_any_shape_and_dtype(bits):
    codes2d = torch.randint(0, 1 << bits, (13, 7), dtype=torch.uint8)
    flat = codes2d.reshape(-1)
    assert torch.equal(pack_codes(codes2d, bits), pack_codes(flat, bits))
    assert torch.equal(pack_codes(codes2d.t(), bits), pack_codes(codes2d.t().contiguous(), bits))
    assert torch.equal(pack_codes(flat.to(torch.int64), bits), pack_codes(flat, bits))


def test_pack_does_not_alias_input_at_8_bits():
    codes = torch.arange(10, dtype=torch.uint8)
    packed = pack_codes(codes, 8)
    packed[0] = 99
    assert int(codes[0]) == 0


@pytest.mark.parametrize("bits", BITS)
def test_unpack_wrong_size_raises(bits):
    for n in (0, 1, 7, 8, 9, 50):
        packed = pack_codes(rand_codes(n, bits), bits)
        too_long = torch.cat([packed, torch.zeros(1, dtype=torch.uint8)])
        with pytest.raises(ValueError):
            unpack_codes(too_long, bits, n)
        if packed.numel():
            with pytest.raises(ValueError):
                unpack_codes(packed[:-1], bits, n)
        # the same buffer read as a count needing a different number of bytes
        other = n + 8
        with pytest.raises(ValueError):
            unpack_codes(packed, bits, other)


@pytest.mark.parametrize("bits", [0, 9, 16, -1])
def test_bad_bits_rejected(bits):
    with pytest.raises(QuantConfigError):
        pack_codes(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(QuantConfigError):
        unpack_codes(torch.zeros(8, dtype=torch.uint8), bits, 8)


def test_packed_nbytes_formula():
    for bits in BITS:
        for n in range(0, 200):
            assert packed_nbytes(n, bits) == math.ceil(n * bits / 8)
