"""Typed, frozen quantization settings (the torchao pattern: config objects, not flag soup)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import QuantConfigError

Granularity = Literal["tensor", "channel", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 1..8, else raise a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantConfigError(
            f"{what}={bits!r} is outside {MIN_BITS}..{MAX_BITS}: codes are packed into bytes, "
            f"choose an integer from {MIN_BITS} to {MAX_BITS}"
        )
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Defaults reproduce the TVQ paper: asymmetric min-max, one scale per tensor.

    Attributes:
        bits: code width, 1..8.
        granularity: ``"tensor"`` (one scale/zero-point, the paper's), ``"channel"`` (one per
            output row, dim 0) or ``"group"`` (one per ``group_size`` consecutive values of the
            flattened tensor).
        group_size: values per group when ``granularity == "group"``.
        symmetric: absmax instead of min-max (zero-point fixed at ``2**(bits-1)``); needs
            ``bits >= 2``.
    """

    bits: int = 4
    granularity: Granularity = "tensor"
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(
                f"granularity={self.granularity!r} is unknown: choose one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantConfigError(f"group_size={self.group_size!r} must be a positive integer")
        if self.symmetric and self.bits < 2:
            raise QuantConfigError("symmetric quantization needs bits >= 2 (1 bit has no zero level)")

    def with_bits(self, bits: int) -> "QuantSpec":
        return QuantSpec(bits, self.granularity, self.group_size, self.symmetric)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantSpec":
        return cls(**data)
