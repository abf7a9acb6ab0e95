"""Dense-prediction metrics as torchmetrics ``Metric`` objects, plus the multi-task Δm.

Every metric is an exact global per-pixel mean over the whole evaluated set: its states are sums
and counts (``dist_reduce_fx="sum"``), so under DDP ``compute()`` all-reduces them and gives the
same numbers as one process on the union of the data (docs/algorithms.md §6).

- :class:`SegmentationMetrics`: ``{"miou", "pixel_acc"}`` from a summed confusion matrix;
- :class:`DepthMetrics`: ``{"abs_err", "rel_err"}`` over pixels with target > 0;
- :class:`NormalMetrics`: ``{"mean", "median", "within_11_25", "within_22_5", "within_30"}`` of
  the angular error over pixels whose target has non-zero length (median from a 0.01° histogram);
- :class:`MetricEntry`: one entry of such a dict-valued metric as a scalar metric (what the
  multi-task modules log);
- :func:`delta_m`: the relative multi-task gain over per-task baselines, in percent.
"""
from .delta_m import delta_m
from .depth import DepthMetrics
from .entry import MetricEntry
from .normal import NORMAL_THRESHOLDS, NormalMetrics, angular_errors
from .segmentation import SegmentationMetrics

__all__ = ["NORMAL_THRESHOLDS", "DepthMetrics", "MetricEntry", "NormalMetrics", "SegmentationMetrics",
           "angular_errors", "delta_m"]
