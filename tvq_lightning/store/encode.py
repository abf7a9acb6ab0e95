"""Per-key encoding of task vectors (the store writer's inner loop), dispatched to the scheme.

Pure functions of one key's tensors returning what to save; the writer owns all I/O. The
schemes' own encoders are in ``tvq_lightning/quant/schemes/``.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..quant.kernels import sub_minmax
from .layout import KeyInfo, StoreConfig


_local = threading.local()


def scratch(numel: int) -> Tensor:
    """A per-thread float32 buffer of at least ``numel`` elements (reused across keys)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 16))
        _local.buf = buf
    return buf[:numel]


def task_vector_into(finetuned: Tensor, pretrained: Tensor, out: Tensor, *, label: str, key: str) -> tuple[Tensor, float, float]:
    """``out = finetuned - pretrained`` (float32) with its range; NaN / Inf is an error."""
    tau, lo, hi, finite = sub_minmax(finetuned, pretrained, out)
    if not finite:
        raise non_finite(label, key)
    return tau, lo, hi


def non_finite(label: str, key: str) -> NonFiniteError:
    """The error for a task vector with NaN or Inf."""
    return NonFiniteError(f"{label}: the task vector of key {key!r} contains NaN or Inf; check the fine-tuned checkpoint (a diverged run?)")


def encode_single(tau: Tensor, lo: float, hi: float, info: KeyInfo, cfg: StoreConfig, key: str,
                  finetuned: Tensor | None = None, shared: Any = None) -> dict[str, Tensor]:
    """Tensors one task saves for ``key`` under ``cfg``'s scheme (empty if nothing is stored);
    ``shared``: the decoded shared part of a store whose shared file stays frozen."""
    return cfg.scheme_impl.encode_task(tau, lo, hi, info, cfg, key, finetuned=finetuned, shared=shared)


def encode_joint(taus: Sequence[Tensor], ranges: Sequence[tuple[float, float]], info: KeyInfo, cfg: StoreConfig,
                 key: str) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """A scheme with a shared file, one key of every task at once: (shared tensors, per-task tensors)."""
    return cfg.scheme_impl.encode_joint(taus, ranges, info, cfg, key)
