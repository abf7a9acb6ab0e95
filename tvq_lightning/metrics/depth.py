"""Depth: absolute and relative error over the valid pixels (target > 0) of a whole set.

abs_err = Σ |p − t| / N and rel_err = Σ |p − t| / t / N, with the sums and the valid-pixel count
N taken over every valid pixel of every image (an exact global per-pixel mean, not a mean of
per-image means), accumulated in float64. A pixel is valid where its target is > 0 (0 and
NaN targets are missing depth). With no valid pixel both numbers are NaN.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def _check_shapes(kind: str, preds: Tensor, target: Tensor, channels: int) -> None:
    if preds.shape != target.shape or preds.dim() != 4 or preds.shape[1] != channels:
        raise ValueError(f"{kind} predictions {tuple(preds.shape)} and targets {tuple(target.shape)} must both be "
                         f"(B, {channels}, H, W)")


class DepthMetrics(Metric):
    """``compute() -> {"abs_err": ..., "rel_err": ...}``; ``update(preds, target)`` with
    ``(B, 1, H, W)`` predictions and targets."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for name in ("abs_sum", "rel_sum", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        _check_shapes("depth", preds, target, 1)
        valid = target > 0
        t = target[valid].double()
        err = (preds.detach()[valid].double() - t).abs()
        self.abs_sum += err.sum()
        self.rel_sum += (err / t).sum()
        self.count += valid.sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        if float(n) == 0:
            nan = torch.tensor(float("nan"))
            return {"abs_err": nan, "rel_err": nan.clone()}
        return {"abs_err": (self.abs_sum / n).float(), "rel_err": (self.rel_sum / n).float()}
