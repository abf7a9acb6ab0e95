"""Depth estimation: one map per image, ``(B, 1, H, W)``; targets ``(B, 1, H, W)`` with 0 where depth is missing.

- head: a :class:`~tvq_lightning.models.dense.DenseHead` with one output channel, trained with the
  encoder. Its output is the depth itself, unconstrained (no softplus / exp): the papers' NYUv2
  heads regress raw depth under an L1 loss, a linear output keeps the gradient alive for any
  prediction, and the metrics then score exactly what the head says (a negative prediction is
  simply far off);
- loss: L1 averaged over the pixels with target > 0;
- adaptation objective: depth has no entropy (``adapts_to_expert``): AdaMerging minimises the L1
  distance to the task expert's predicted map (every pixel), cached once per sample;
- metrics: ``abs_err`` (main, lower is better) and ``rel_err``, exact global means over valid
  pixels (:class:`~tvq_lightning.metrics.DepthMetrics`);
- expert pseudo-target (Tinting): the expert's map. Confidence (a documented proxy: a regression
  head predicts no uncertainty): local coherence, 1 / (1 + s / |m|) with m and s the mean and
  standard deviation of the prediction over the pixel's 3 x 3 neighbourhood: smooth surfaces are
  trusted, depth edges and noisy predictions less, the same way for the expert and the merged
  model. Two maps agree where they differ by at most ``agree_tol`` (5 %) of the larger magnitude;
  the pseudo-target loss is L1 over the kept pixels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torchmetrics import Metric

from ..metrics import DepthMetrics
from ._dense import DenseTaskType, local_mean
from ._registry import register_task_type
from .base import MetricInfo


@register_task_type("depth")
class Depth(DenseTaskType):
    """Per-pixel depth regression (see the module docstring).

    Args:
        agree_tol: relative tolerance under which two depth maps agree at a pixel (Tinting++).
        decoder, decoder_channels, head_options: the head built for fine-tuning (:class:`~._dense.DenseTaskType`).
    """

    metric_infos = (MetricInfo("abs_err", higher_is_better=False), MetricInfo("rel_err", higher_is_better=False))
    metric_keys = {"abs_err": "abs_err", "rel_err": "rel_err"}
    out_channels = 1
    adapts_to_expert = True

    def __init__(self, agree_tol: float = 0.05, decoder: str = "unet",
                 decoder_channels: int | Sequence[int] | None = None, head_options: Mapping[str, Any] | None = None):
        super().__init__(decoder, decoder_channels, head_options)
        self.agree_tol = float(agree_tol)

    # -- objectives
    def valid(self, target: Tensor) -> Tensor:
        return target[:, 0] > 0

    def pixel_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return (outputs - target).abs()[:, 0]

    # -- metrics
    def make_metric(self, num_outputs: int | None, **kwargs: Any) -> Metric:
        return DepthMetrics(**kwargs)

    def score(self, outputs: Tensor, targets: Tensor) -> tuple[float, float]:
        valid = self.valid(targets)
        return float(self.pixel_loss(outputs, targets)[valid].double().sum()), float(valid.sum())

    # -- predictions, experts, confidence
    def predict(self, outputs: Tensor) -> Tensor:
        return outputs

    def confidence(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        mean = local_mean(outputs)
        std = (local_mean(outputs.square()) - mean.square()).clamp_min(0).sqrt()
        return outputs, (1.0 / (1.0 + std / (mean.abs() + 1e-6)))[:, 0]

    def agree(self, a: Tensor, b: Tensor) -> Tensor:
        return ((a - b).abs() <= self.agree_tol * a.abs().maximum(b.abs()))[:, 0]
