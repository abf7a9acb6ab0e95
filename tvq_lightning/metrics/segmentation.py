"""Semantic segmentation: mean IoU and pixel accuracy over a whole set, from a summed confusion matrix.

The state is torchmetrics' ``MulticlassConfusionMatrix`` state (``confmat``, ``(C, C)`` counts,
rows = target, columns = prediction, ``dist_reduce_fx="sum"``). Pixels whose label is
``ignore_index`` or negative are left out, whatever the prediction there. IoU_c = TP_c / (TP_c +
FP_c + FN_c) with everything summed over the set (not per image); mIoU is the mean over the
classes whose union TP + FP + FN is non-empty: a class that is neither labelled nor predicted on
any valid pixel does not count, one that is only predicted counts with IoU 0. (torchmetrics'
``MulticlassJaccardIndex(average="macro")`` applies the same union rule, but rejects negative
labels other than its ``ignore_index``; this class maps them to it and reports both numbers from
one state.) With no valid pixel at all both numbers are NaN.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix


def _nan() -> Tensor:
    return torch.tensor(float("nan"))


class SegmentationMetrics(MulticlassConfusionMatrix):
    """``compute() -> {"miou": ..., "pixel_acc": ...}`` (fractions in [0, 1]).

    Args:
        num_classes: the class count C.
        ignore_index: the label of unlabelled pixels (any negative label is ignored as well).

    ``update(preds, target)``: ``preds`` are logits ``(B, C, H, W)`` (arg-maxed over the classes)
    or label maps ``(B, H, W)``; ``target`` is ``(B, H, W)`` integer labels.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = -1, **kwargs: Any):
        super().__init__(int(num_classes), ignore_index=int(ignore_index), normalize=None, validate_args=False,
                         **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:
        if target.is_floating_point():
            raise ValueError(f"segmentation targets are integer label maps; got {target.dtype}")
        want = (target.shape[0], self.num_classes, *target.shape[1:])
        if tuple(preds.shape) not in (tuple(target.shape), want):
            raise ValueError(f"segmentation predictions of shape {tuple(preds.shape)} do not fit targets of shape "
                             f"{tuple(target.shape)}: give logits {want} or a label map of the target's shape")
        labels = torch.where(target < 0, torch.full_like(target, self.ignore_index), target)
        bad = (labels >= self.num_classes) & (labels != self.ignore_index)
        if bool(bad.any()):
            raise ValueError(f"segmentation label {int(labels[bad].max())} is not a class of {self.num_classes} "
                             f"nor the ignore index {self.ignore_index}")
        super().update(preds, labels)

    def class_iou(self) -> Tensor:
        """Per-class IoU over the set so far (NaN for a class with an empty union or the ignore index);
        this process's counts only (not all-reduced)."""
        cm = self.confmat.double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = tp / union
        iou[union == 0] = float("nan")
        if 0 <= self.ignore_index < self.num_classes:
            iou[self.ignore_index] = float("nan")
        return iou

    def compute(self) -> dict[str, Tensor]:
        iou = self.class_iou()
        present = ~iou.isnan()
        total = self.confmat.sum()
        miou = iou[present].mean() if bool(present.any()) else _nan()
        acc = self.confmat.diagonal().sum().double() / total if int(total) > 0 else _nan()
        return {"miou": miou.float(), "pixel_acc": acc.float()}
