"""Surface normals: one 3-vector map per image, ``(B, 3, H, W)``; targets with zero length where missing.

- head: a :class:`~tvq_lightning.models.dense.DenseHead` with three output channels, trained with
  the encoder; its raw output is normalised wherever a direction is read (loss, metrics,
  :meth:`Normal.predict`);
- loss: 1 − cos(prediction, target) averaged over the pixels whose target has non-zero length;
- adaptation objective: normals have no entropy (``adapts_to_expert``): AdaMerging minimises
  1 − cos to the task expert's predicted normals (every pixel), cached once per sample;
- metrics: ``mean_angle`` (main, lower is better), ``median_angle`` (degrees) and
  ``within_11_25`` / ``within_22_5`` / ``within_30`` (fractions, reported in %)
  (:class:`~tvq_lightning.metrics.NormalMetrics`);
- expert pseudo-target (Tinting): the expert's unit normals. Confidence (a documented proxy):
  local coherence, the length of the mean unit normal over the pixel's 3 x 3 neighbourhood (1 on
  a flat surface, lower at creases and where the prediction is noisy). Two maps agree where their
  angle is under ``agree_deg`` (11.25°); the pseudo-target loss is 1 − cos over the kept pixels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from ..metrics import NormalMetrics, angular_errors
from ._dense import DenseTaskType, local_mean
from ._registry import register_task_type
from .base import MetricInfo


@register_task_type("normal")
class Normal(DenseTaskType):
    """Per-pixel surface-normal regression (see the module docstring).

    Args:
        agree_deg: the angle (degrees) under which two normal maps agree at a pixel (Tinting++).
        decoder, decoder_channels, head_options: the head built for fine-tuning (:class:`~._dense.DenseTaskType`).
    """

    metric_infos = (MetricInfo("mean_angle", higher_is_better=False),
                    MetricInfo("median_angle", higher_is_better=False),
                    MetricInfo("within_11_25", higher_is_better=True, percent=True),
                    MetricInfo("within_22_5", higher_is_better=True, percent=True),
                    MetricInfo("within_30", higher_is_better=True, percent=True))
    metric_keys = {"mean_angle": "mean", "median_angle": "median", "within_11_25": "within_11_25",
                   "within_22_5": "within_22_5", "within_30": "within_30"}
    out_channels = 3
    adapts_to_expert = True

    def __init__(self, agree_deg: float = 11.25, decoder: str = "unet",
                 decoder_channels: int | Sequence[int] | None = None, head_options: Mapping[str, Any] | None = None):
        super().__init__(decoder, decoder_channels, head_options)
        self.agree_deg = float(agree_deg)

    # -- objectives
    def valid(self, target: Tensor) -> Tensor:
        return target.norm(dim=1) > 0

    def pixel_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return 1.0 - F.cosine_similarity(outputs, target, dim=1, eps=1e-8)

    # -- metrics
    def make_metric(self, num_outputs: int | None, **kwargs: Any) -> Metric:
        return NormalMetrics(**kwargs)

    def score(self, outputs: Tensor, targets: Tensor) -> tuple[float, float]:
        angles, valid = angular_errors(outputs, targets)
        return float(angles[valid].sum()), float(valid.sum())

    # -- predictions, experts, confidence
    def predict(self, outputs: Tensor) -> Tensor:
        return F.normalize(outputs, dim=1)

    def confidence(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        unit = F.normalize(outputs, dim=1)
        return unit, local_mean(unit).norm(dim=1)

    def agree(self, a: Tensor, b: Tensor) -> Tensor:
        return F.cosine_similarity(a, b, dim=1, eps=1e-8) > math.cos(math.radians(self.agree_deg))
