"""Surface normals: angular error statistics over the valid pixels of a whole set.

Per pixel, with p̂ = p / |p| (a zero prediction counts as 90° off) and t̂ = t / |t|, the error is
arccos(clamp(p̂ · t̂, −1, 1)) in degrees, computed in float64. A pixel is valid where its target
has non-zero length. Over every valid pixel of the set:

- ``mean``: the exact mean angle (a float64 sum and a count);
- ``within_11_25`` / ``within_22_5`` / ``within_30``: the exact fractions (in [0, 1]) of angles
  strictly under 11.25°, 22.5° and 30° (integer counts);
- ``median``: from a fixed histogram of the angles over [0°, 180°] (``bin_width`` 0.01° by
  default, 18 000 int64 bins, summed over processes under DDP): the bin holding the lower median
  (rank ⌊(N − 1) / 2⌋, what ``torch.median`` returns) and a linear position inside it, so it is
  within one bin width (0.01°) of the exact median — finer than the two decimals papers print.

With no valid pixel every number is NaN.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .depth import _check_shapes

#: The thresholds (degrees) of the ``within_*`` fractions, with their keys.
NORMAL_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


def angular_errors(preds: Tensor, target: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """``(angles, valid)``: the angle (degrees, float64) between ``preds`` and ``target`` ``(B, 3, H, W)``
    at every pixel ``(B, H, W)``, and where the target has non-zero length."""
    p, t = preds.detach().double(), target.detach().double()
    t_len = t.norm(dim=1)
    valid = t_len > 0
    cos = (p * t).sum(1) / (p.norm(dim=1).clamp_min(eps) * t_len.clamp_min(eps))
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))), valid


class NormalMetrics(Metric):
    """``compute() -> {"mean", "median", "within_11_25", "within_22_5", "within_30"}`` (degrees;
    fractions in [0, 1]); ``update(preds, target)`` with ``(B, 3, H, W)`` maps.

    Args:
        bin_width: the median histogram's bin width in degrees (the median's resolution).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, bin_width: float = 0.01, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < bin_width <= 180:
            raise ValueError(f"bin_width={bin_width}: give a width in (0, 180] degrees")
        self.num_bins = int(math.ceil(180.0 / bin_width - 1e-9))
        self.bin_width = 180.0 / self.num_bins
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(NORMAL_THRESHOLDS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("angle_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        _check_shapes("normal", preds, target, 3)
        angles, valid = angular_errors(preds, target)
        a = angles[valid]
        idx = (a / self.bin_width).long().clamp_(0, self.num_bins - 1)
        self.hist += torch.bincount(idx, minlength=self.num_bins)
        self.within += torch.stack([(a < th).sum() for th in NORMAL_THRESHOLDS.values()])
        self.angle_sum += a.sum()
        self.count += a.numel()

    def median(self) -> Tensor:
        """The median angle from the histogram (see the module docstring); NaN when empty."""
        n = int(self.count)
        if n == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        k = (n - 1) // 2
        cum = self.hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device), right=True))
        before = int(cum[b]) - int(self.hist[b])
        return torch.tensor((b + (k - before + 0.5) / int(self.hist[b])) * self.bin_width, dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        n = int(self.count)
        nan = float("nan")
        out = {"mean": self.angle_sum / n if n else torch.tensor(nan), "median": self.median()}
        for i, key in enumerate(NORMAL_THRESHOLDS):
            out[key] = self.within[i].double() / n if n else torch.tensor(nan)
        return {k: v.float() for k, v in out.items()}
