"""``QTensor``: one quantized tensor in packed form (codes + per-block zero-point and scale)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .affine import _rows, affine_params, block_ranges, dequantize_affine, quantize_rows
from .config import QuantSpec
from .kernels import quantize_pack, unpack_dequantize
from .packing import pack_codes, packed_nbytes, unpack_codes

# Suffixes under which a QTensor's parts are saved next to its state-dict key. ``#`` cannot
# appear in a torch module's attribute path, so they never collide with real keys.
CODES, ZERO, SCALE = "#q", "#z", "#s"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def num_codes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Codes stored for a tensor of ``shape`` (group-wise pads the last group)."""
    n = _numel(shape)
    if spec.granularity == "group":
        return -(-n // spec.group_size) * spec.group_size
    return n


@dataclass(frozen=True)
class QTensor:
    """A tensor quantized with :class:`QuantSpec` and bit-packed.

    ``packed`` holds ``ceil(num_codes * bits / 8)`` bytes; ``zero_point`` (int32) and ``scale``
    (float32) hold one entry per block (1 for per-tensor, rows for per-channel, groups for
    group-wise). ``dequantize()`` gives ``(q - z) * scale`` in the original shape.
    """

    packed: Tensor
    zero_point: Tensor
    scale: Tensor
    shape: tuple[int, ...]
    spec: QuantSpec

    @classmethod
    def quantize(cls, x: Tensor, spec: QuantSpec, value_range: tuple[float, float] | None = None) -> "QTensor":
        """Quantize and pack ``x``.

        ``value_range``: the (min, max) of ``x`` when already known (per-tensor only), e.g. from
        the fused subtract pass, which saves one pass over the data.
        """
        if not x.is_floating_point():
            raise TypeError(f"QTensor.quantize expects a floating tensor, got {x.dtype}")
        x32 = x if x.dtype == torch.float32 else x.float()
        rows = _rows(x32.contiguous() if not x32.is_contiguous() else x32, spec)
        if value_range is not None and spec.granularity == "tensor":
            lo = torch.tensor([value_range[0]], dtype=torch.float32)
            hi = torch.tensor([value_range[1]], dtype=torch.float32)
        elif rows.numel():
            lo, hi = block_ranges(rows)
        else:
            lo = hi = torch.zeros(rows.shape[0])
        s, z, scale = affine_params(lo.cpu(), hi.cpu(), spec)
        s, z, scale = s.to(x.device), z.to(x.device), scale.to(x.device)
        packed = torch.empty(packed_nbytes(rows.numel(), spec.bits), dtype=torch.uint8, device=x.device)
        if not quantize_pack(rows, s, z, spec.bits, packed):
            packed = pack_codes(quantize_rows(rows, s, z, spec.bits), spec.bits)
        return cls(packed, z.to(torch.int32), scale, tuple(x.shape), spec)

    def codes(self) -> Tensor:
        """Unpacked uint8 codes, one row per block."""
        n = num_codes(self.shape, self.spec)
        return unpack_codes(self.packed, self.spec.bits, n).view(self.zero_point.numel(), -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - z) * scale`` in the original shape."""
        n = num_codes(self.shape, self.spec)
        out = torch.empty(n, dtype=torch.float32, device=self.packed.device)
        if unpack_dequantize(self.packed, self.zero_point, self.scale, self.spec.bits, n, out):
            out = out[: _numel(self.shape)].view(self.shape)
            return out if dtype == torch.float32 else out.to(dtype)
        return dequantize_affine(self.codes(), self.zero_point, self.scale, self.shape, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.zero_point, self.scale))

    def to(self, device: torch.device | str) -> "QTensor":
        return replace(self, packed=self.packed.to(device), zero_point=self.zero_point.to(device),
                       scale=self.scale.to(device))

    def state(self, key: str) -> dict[str, Tensor]:
        """The tensors to save under ``key`` (see ``CODES``, ``ZERO``, ``SCALE``)."""
        return {key + CODES: self.packed, key + ZERO: self.zero_point, key + SCALE: self.scale}

    @classmethod
    def from_state(cls, packed: Tensor, zero_point: Tensor, scale: Tensor, shape: tuple[int, ...],
                   spec: QuantSpec) -> "QTensor":
        expected = packed_nbytes(num_codes(shape, spec), spec.bits)
        if packed.numel() != expected or packed.dtype != torch.uint8:
            raise ValueError(f"packed codes have {packed.numel()} {packed.dtype} bytes, expected {expected} uint8")
        return cls(packed, zero_point, scale, tuple(int(d) for d in shape), spec)
