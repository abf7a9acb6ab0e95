"""Semantic segmentation: one logit map per image, ``(B, C, H, W)``; targets ``(B, H, W)`` long labels.

- head: a :class:`~tvq_lightning.models.dense.DenseHead` with C output channels (C: the
  datamodule's ``num_classes(task)``), trained with the encoder;
- loss: per-pixel cross-entropy averaged over the labelled pixels (label ``ignore_index`` = −1, or
  any negative label, is ignored; a batch without a labelled pixel gives a differentiable 0);
- adaptation objective (AdaMerging): the mean per-pixel Shannon entropy of the softmax;
- metrics: ``miou`` (main, higher is better) and ``pixel_acc``, fractions reported in %, from one
  confusion matrix over the whole set (:class:`~tvq_lightning.metrics.SegmentationMetrics`);
- expert pseudo-target (Tinting): the per-pixel argmax label map, with the per-pixel maximum softmax
  probability as confidence; two maps agree where the labels are equal; the pseudo-target loss is
  the cross-entropy over the kept pixels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from ..errors import TvqError
from ..metrics import SegmentationMetrics
from ._dense import DenseTaskType
from ._registry import register_task_type
from .base import MetricInfo
from .classification import softmax_entropy


@register_task_type("segmentation")
class Segmentation(DenseTaskType):
    """Per-pixel classification (see the module docstring).

    Args:
        ignore_index: the label of unlabelled pixels (negative labels are always ignored).
        decoder, decoder_channels, head_options: the head built for fine-tuning (:class:`~._dense.DenseTaskType`).
    """

    metric_infos = (MetricInfo("miou", higher_is_better=True, percent=True),
                    MetricInfo("pixel_acc", higher_is_better=True, percent=True))
    metric_keys = {"miou": "miou", "pixel_acc": "pixel_acc"}

    def __init__(self, ignore_index: int = -1, decoder: str = "unet", decoder_channels: int | Sequence[int] | None = None,
                 head_options: Mapping[str, Any] | None = None):
        super().__init__(decoder, decoder_channels, head_options)
        self.ignore_index = int(ignore_index)

    def data_outputs(self, datamodule: Any, task: str) -> int | None:
        fn = getattr(datamodule, "num_classes", None)
        try:
            return int(fn(task)) if callable(fn) else None
        except NotImplementedError:
            return None

    # -- objectives
    def valid(self, target: Tensor) -> Tensor:
        return (target >= 0) & (target != self.ignore_index)

    def pixel_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(outputs, target.where(self.valid(target), 0), reduction="none")

    def adaptation_objective(self, outputs: Tensor) -> Tensor:
        return softmax_entropy(outputs.movedim(1, -1)).mean()

    # -- metrics
    def make_metric(self, num_outputs: int | None, **kwargs: Any) -> Metric:
        return SegmentationMetrics(int(num_outputs), self.ignore_index, **kwargs)

    def score(self, outputs: Tensor, targets: Tensor) -> tuple[float, float]:
        raise TvqError("the mean IoU is not a sum over batches; evaluate segmentation with the task type's metrics()")

    # -- predictions, experts, confidence
    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.argmax(1)

    def confidence(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        conf, labels = outputs.softmax(1).max(1)
        return labels, conf
