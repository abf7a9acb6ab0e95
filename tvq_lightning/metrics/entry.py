"""One entry of a dict-valued metric, as a metric of its own (scalar ``compute()``).

The multi-task modules keep ``{name: Metric}`` per task and log ``float(metric.compute())``
(:meth:`~tvq_lightning.tasks.TaskType.metrics`); the dense metrics compute several numbers from
the same states. :class:`MetricEntry` wraps one metric and returns one of its entries; each entry
owns its own wrapped metric, so computing or resetting one never affects another (the price: the
per-batch update runs once per entry).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.wrappers.abstract import WrapperMetric


class MetricEntry(WrapperMetric):
    """``metric.compute()[key]``; updates, synchronisation (DDP) and resets are the wrapped metric's.

    Args:
        metric: a metric whose ``compute()`` returns a dict.
        key: the entry to return.
    """

    def __init__(self, metric: Metric, key: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.metric = metric
        self.key = key

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.metric.update(*args, **kwargs)

    def compute(self) -> Tensor:
        return self.metric.compute()[self.key]

    def reset(self) -> None:
        super().reset()
        self.metric.reset()

    def extra_repr(self) -> str:
        return f"key={self.key!r}"
