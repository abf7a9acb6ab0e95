"""The abstract :class:`Scheme`: everything about one way of storing task vectors.

A scheme owns (docs/algorithms.md §3 gives the formulas of the built-in ones):

- configuration: which ``StoreConfig`` fields it uses (:meth:`widths`, :meth:`validate`), its
  :meth:`label`, and the per-key widths it records in the layout (:attr:`key_fields`);
- encoding: what one task's key stores (:meth:`encode_task`), a shared file built from every task
  at once (:meth:`encode_joint`, RTVQ's base), and whether the fused per-tensor path applies
  (:meth:`fused_spec`);
- decoding, from the stored tensors of one key on the CPU or any torch device, for the store
  reader, the merge engine and the packed adaptation buffers alike (:meth:`decode_shared`,
  :meth:`decode`); exact level histograms for TIES' thresholds (:meth:`levels`);
- adding tasks to a store (:meth:`add_mode`), its cost in bits per parameter
  (:meth:`bits_per_param`), and bit allocation (:attr:`allocation_fields`,
  :meth:`allocation_candidates`, :meth:`error_table`).

Stored tensors of a key ``k`` are named ``k + suffix``: ``""`` for a full-precision float32
tensor (keys the policy does not quantize), and scheme-defined suffixes (``#q``, ``#z``, ``#s``
for an affine :class:`~..qtensor.QTensor`) for quantized ones. ``parts`` below is a mapping
from suffix to tensor for one key of one file (or of the packed buffers).

Schemes never import the store package at module level (the store imports them); a
``StoreConfig`` and ``KeyInfo`` are passed in.
"""
from __future__ import annotations

import warnings

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ...errors import QuantConfigError
from ..config import QuantSpec
from ..qtensor import CODES, SCALE, ZERO, QTensor

if TYPE_CHECKING:  # pragma: no cover
    from ...store.layout import KeyInfo, Layout, StoreConfig

Parts = Mapping[str, Tensor]
AFFINE = (CODES, ZERO, SCALE)


class Scheme:
    """Base class of quantization schemes; register subclasses with ``register_scheme``."""

    #: registry name (``StoreConfig.scheme``)
    name: ClassVar[str] = ""
    #: whether keys the policy selects are quantized at all (FP32: no)
    quantizes: ClassVar[bool] = True
    #: whether decoding needs theta_0 (FQ stores fine-tuned weights)
    needs_pretrained: ClassVar[bool] = False
    #: whether the store has a shared file built from all tasks (RTVQ's base)
    shared_file: ClassVar[bool] = False
    #: whether a zero task vector stores nothing
    skips_zero: ClassVar[bool] = True
    #: ``KeyInfo`` width fields of a quantized key, taken from the config (or an allocation)
    key_fields: ClassVar[tuple[str, ...]] = ()
    #: the width fields a bit allocation chooses per key; () = no bit allocation
    allocation_fields: ClassVar[tuple[str, ...]] = ()

    # -- configuration -------------------------------------------------------------------------
    def widths(self, cfg: "StoreConfig") -> tuple[int, ...]:
        """The code widths this scheme uses under ``cfg`` (each is validated as a QuantSpec)."""
        return tuple(getattr(cfg, f) for f in self.key_fields)

    def validate(self, cfg: "StoreConfig") -> None:
        """Raise :class:`QuantConfigError` for settings this scheme cannot use."""
        if cfg.budget is not None and not self.allocation_fields:
            from ._registry import get_scheme, list_schemes

            able = [n for n in list_schemes() if get_scheme(n).allocation_fields]
            raise QuantConfigError(f"--budget applies to the {' and '.join(able)} schemes, not {self.name}")
        for b in self.widths(cfg) or (2 if cfg.symmetric else 1,):
            QuantSpec(b, cfg.granularity, cfg.group_size, cfg.symmetric)

    def label(self, cfg: "StoreConfig") -> str:
        """Short name as in the paper's tables (``TVQ-INT3``); ``NAME-budgetB`` with a budget."""
        if cfg.budget is not None:
            return f"{self.name.upper()}-budget{cfg.budget:g}"
        return self.fixed_label(cfg)

    def fixed_label(self, cfg: "StoreConfig") -> str:
        return self.name.upper()

    def detail(self, cfg: "StoreConfig") -> str:
        """The settings ``tvq inspect`` shows next to the label."""
        return f"{cfg.granularity} granularity"

    # -- layout --------------------------------------------------------------------------------
    def key_widths(self, cfg: "StoreConfig", key: str, allocation: Any = None) -> dict[str, int]:
        """``KeyInfo`` fields of quantized key ``key``: the config's widths or the allocation's."""
        if allocation is not None:
            return {f: getattr(allocation, f)[key] for f in self.key_fields}
        return {f: getattr(cfg, f) for f in self.key_fields}

    def task_bits(self, info: "KeyInfo") -> int:
        """Width of the per-task codes of a quantized key."""
        return info.bits

    def blocks(self, cfg: "StoreConfig", info: "KeyInfo") -> int:
        """Scale (and zero-point) entries per quantized tensor."""
        if cfg.granularity == "tensor":
            return 1
        if cfg.granularity == "channel":
            return info.shape[0] if info.shape else 1
        return -(-info.numel // cfg.group_size)

    def stored_parts(self, cfg: "StoreConfig", info: "KeyInfo") -> tuple[dict[str, tuple[str, int]], int]:
        """``({suffix: (dtype tag, ndim)}, upper bound of their bytes)`` of one quantized key."""
        parts = {CODES: ("U8", 1), ZERO: ("I32", 1), SCALE: ("F32", 1)}
        return parts, info.numel + 8 * self.blocks(cfg, info) + 64

    # -- encoding ------------------------------------------------------------------------------
    def fused_spec(self, cfg: "StoreConfig", info: "KeyInfo") -> QuantSpec | None:
        """The spec when a key is per-tensor affine quantization of ``theta_t - theta_0`` (the
        fused numba path of ``store/fused.py`` then encodes it), else None."""
        return None

    def encode_task(self, tau: Tensor, lo: float, hi: float, info: "KeyInfo", cfg: "StoreConfig", key: str, *,
                    finetuned: Tensor | None = None, shared: Any = None) -> dict[str, Tensor]:
        """What one task stores for ``key``: ``{key + suffix: tensor}``; empty for a zero vector.

        ``lo``, ``hi``: the range of ``tau``; ``finetuned``: theta_t's tensor; ``shared``: the
        decoded shared part when tasks are added to a store with a frozen shared file.
        """
        if lo == 0.0 and hi == 0.0 and self.skips_zero:
            return {}
        if not info.quantized:
            return {key: tau}
        return self.encode_quantized(tau, lo, hi, info, cfg, key, finetuned=finetuned, shared=shared)

    def encode_quantized(self, tau: Tensor, lo: float, hi: float, info: "KeyInfo", cfg: "StoreConfig", key: str, *,
                         finetuned: Tensor | None = None, shared: Any = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode_joint(self, taus: Sequence[Tensor], ranges: Sequence[tuple[float, float]], info: "KeyInfo",
                     cfg: "StoreConfig", key: str) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Schemes with a shared file: ``(shared tensors, per-task tensors)`` of one quantized key
        from every task's vector (``taus`` may be overwritten)."""
        raise NotImplementedError(f"scheme {self.name} has no shared file")

    # -- decoding ------------------------------------------------------------------------------
    def qtensor(self, cfg: "StoreConfig", info: "KeyInfo", parts: Parts, bits: int | None = None) -> QTensor | None:
        """The affine QTensor stored in ``parts`` (None if absent); ``bits`` defaults to the task width."""
        if CODES not in parts or ZERO not in parts:
            return None
        spec = cfg.spec(self.task_bits(info) if bits is None else bits)
        return QTensor.from_state(parts[CODES], parts[ZERO], parts[SCALE], info.shape, spec)

    def decode_shared(self, cfg: "StoreConfig", info: "KeyInfo", shared: Parts | None,
                      pretrained: Tensor | None = None) -> Any:
        """What every task's decode of one key needs, computed once (RTVQ: the dequantized base;
        FQ: theta_0 as float32); None when nothing is shared."""
        return None

    def decode(self, cfg: "StoreConfig", info: "KeyInfo", parts: Parts, shared: Any = None) -> Tensor | None:
        """One task's float32 task vector of a key, on the parts' device; None when nothing is stored."""
        if not info.quantized:
            return parts[""].float().clone() if "" in parts else None
        return self.decode_quantized(cfg, info, parts, shared)

    def decode_quantized(self, cfg: "StoreConfig", info: "KeyInfo", parts: Parts, shared: Any) -> Tensor | None:
        q = self.qtensor(cfg, info, parts)
        return None if q is None else q.dequantize()

    def levels(self, cfg: "StoreConfig", info: "KeyInfo", parts: Parts,
               shared: Parts | None = None) -> tuple[Tensor, Tensor] | None:
        """Exact ``(|value|, count)`` histogram of the decoded vector, when the scheme has one
        (``shared``: the key's parts in the store's shared file, e.g. RTVQ's base)."""
        return None

    # -- adding tasks ----------------------------------------------------------------------------
    def add_mode(self, layout: "Layout", requested: str | None) -> str:
        """How tasks are added to a store: ``append`` (no shared file), ``frozen`` or ``recompute``.

        With a shared file, ``requested=None`` keeps it frozen when it was built from two or more
        tasks and recomputes it otherwise; a frozen single-task base is refused (it would be that
        task's own vector, a base that makes the new tasks' offsets larger than the vectors).
        """
        if not self.shared_file:
            return "append"
        if requested not in (None, "frozen", "recompute"):
            raise QuantConfigError(f"rtvq_base={requested!r}: choose 'frozen' or 'recompute'")
        single = len(layout.base_tasks) < 2
        if requested is None:
            requested = "recompute" if single else "frozen"
        if requested == "frozen" and single:
            who = f"the single task {layout.base_tasks[0]!r}" if layout.base_tasks else "no task"
            raise QuantConfigError(
                f"this store's {self.name.upper()} base was built from {who}: a frozen base would be that task's "
                f"vector, and the new tasks' error would exceed their norm; pass rtvq_base='recompute' "
                f"(--rtvq-base recompute) or leave it unset")
        if requested == "frozen":
            warnings.warn(
                f"adding tasks against a frozen {self.name.upper()} base computed from {len(layout.base_tasks)} "
                f"task(s): the new tasks' offsets are wider than those of the base's own tasks (more error); "
                f"for the most accurate store, build it from all tasks at once", stacklevel=3)
        return requested

    # -- cost and bit allocation -------------------------------------------------------------------
    def bits_per_param(self, info: "KeyInfo", num_tasks: int) -> float:
        """Bits per parameter per task of a quantized key (scales and zero-points not counted)."""
        return float(info.bits)

    def width_label(self, info: "KeyInfo") -> str:
        """A quantized key's widths as ``tvq inspect``'s histogram shows them."""
        return str(info.bits)

    def allocation_candidates(self, bits: Sequence[int], num_tasks: int) -> tuple[list[tuple[int, ...]], list[int], int]:
        """``(settings, units, D)``: the width tuples (one entry per allocation field) the
        allocator may give a key, cheapest first; each one's storage in units of ``1/D`` bit per
        parameter per task."""
        return [(b,) for b in bits], list(bits), 1

    def error_table(self, sample: Any) -> Tensor:
        """Measured squared error of every candidate (``quant.error_tables.Sample``), float64,
        ``inf`` where the spec cannot be used; indexed by ``width - 1`` per allocation field."""
        raise NotImplementedError(f"scheme {self.name} has no bit allocation")

    def describe_widths(self, span: Mapping[str, str], per_tensor: bool) -> str:
        """Widths of an allocation in words (``span``: field -> ``"3"`` or ``"1–4"``)."""
        return f"{span['bits']} bits" if per_tensor else f"INT{span['bits']}"


def relative_l2_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (0 when both are zero)."""
    num = torch.linalg.vector_norm((approx.float() - exact.float()).reshape(-1)).item()
    den = torch.linalg.vector_norm(exact.float().reshape(-1)).item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
