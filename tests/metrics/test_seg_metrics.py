"""SegmentationMetrics against a per-class reference: ignored pixels, empty and prediction-only
classes, several updates = one, all-ignored batches; MetricEntry views of it."""
from __future__ import annotations

import math

import pytest
import torch

from tvq_lightning.metrics import MetricEntry, SegmentationMetrics

from _metric_data import C, seg_batch  # noqa: E402


def reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1) -> dict[str, float]:
    pred = logits.argmax(1)
    valid = (labels >= 0) & (labels != ignore_index)
    ious = []
    for c in range(C):
        inter = ((pred == c) & (labels == c) & valid).sum().item()
        union = (((pred == c) | (labels == c)) & valid).sum().item()
        if union and c != ignore_index:
            ious.append(inter / union)
    n = valid.sum().item()
    return {"miou": sum(ious) / len(ious) if ious else math.nan,
            "pixel_acc": (pred == labels)[valid].sum().item() / n if n else math.nan}


def _check(metric_out: dict, ref: dict) -> None:
    for k, v in ref.items():
        assert float(metric_out[k]) == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_matches_reference_with_ignored_and_empty_classes():
    logits, labels = seg_batch(0)
    m = SegmentationMetrics(C)
    m.update(logits, labels)
    _check(m.compute(), reference(logits, labels))
    iou = m.class_iou()
    assert math.isnan(iou[5]) and iou[4] == 0          # never present: left out; predicted only: IoU 0
    assert not any(math.isnan(v) for v in iou[:5].tolist())


def test_several_updates_equal_one_concatenated_update_and_ignored_batches_change_nothing():
    batches = [seg_batch(s) for s in range(3)] + [seg_batch(9, all_ignored=True)]
    m = SegmentationMetrics(C)
    for lo, la in batches:
        m.update(lo, la)
    logits, labels = (torch.cat(x) for x in zip(*batches))
    one = SegmentationMetrics(C)
    one.update(logits, labels)
    assert torch.equal(m.confmat, one.confmat)
    _check(m.compute(), reference(logits, labels))


def test_label_maps_other_ignore_index_and_empty_set():
    logits, labels = seg_batch(1)
    labels = torch.where(labels == -1, torch.full_like(labels, 255), labels)   # -7 stays: still ignored
    m = SegmentationMetrics(C, ignore_index=255)
    m.update(logits.argmax(1), labels)
    _check(m.compute(), reference(logits, labels, ignore_index=255))
    empty = SegmentationMetrics(C)
    empty.update(*seg_batch(2, all_ignored=True))
    assert all(math.isnan(float(v)) for v in empty.compute().values())


def test_in_range_ignore_index_is_not_a_class():
    logits, labels = seg_batch(3)
    m = SegmentationMetrics(C, ignore_index=0)
    m.update(logits, labels)
    _check(m.compute(), reference(logits, labels, ignore_index=0))


def test_bad_inputs():
    logits, labels = seg_batch(0)
    with pytest.raises(ValueError, match="not a class"):
        SegmentationMetrics(C).update(logits, torch.full_like(labels, C))
    with pytest.raises(ValueError, match="do not fit"):
        SegmentationMetrics(C + 1).update(logits, labels)
    with pytest.raises(ValueError, match="integer"):
        SegmentationMetrics(C).update(logits, labels.float())


def test_entries_are_independent_scalar_views():
    logits, labels = seg_batch(4)
    ref = reference(logits, labels)
    entries = {k: MetricEntry(SegmentationMetrics(C), k) for k in ("miou", "pixel_acc")}
    for e in entries.values():
        e.update(logits, labels)
    entries["miou"].compute()
    entries["miou"].reset()                            # does not touch the other entry
    assert float(entries["pixel_acc"].compute()) == pytest.approx(ref["pixel_acc"])
    entries["miou"].update(logits, labels)
    assert float(entries["miou"].compute()) == pytest.approx(ref["miou"])
