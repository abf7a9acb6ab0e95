"""Task types as registered objects: what a head, a loss, a metric and a pseudo-target are per kind of task.

``create_task_type("classification")``, ``"segmentation"``, ``"depth"`` and ``"normal"`` (the dense
types, :mod:`._dense`) come with the package; register others with :func:`register_task_type`.
See :mod:`.base` for the interface.
"""
from ._registry import (
    create_task_type,
    get_task_type,
    list_task_types,
    register_task_type,
    resolve_task_types,
    unregister_task_type,
)
from .base import MetricInfo, TaskType, masked_mean
from .classification import Classification, softmax_entropy
from ._dense import DenseTaskType
from .depth import Depth
from .normal import Normal
from .segmentation import Segmentation

__all__ = ["Classification", "DenseTaskType", "Depth", "MetricInfo", "Normal", "Segmentation", "TaskType",
           "create_task_type", "get_task_type", "list_task_types", "masked_mean", "register_task_type",
           "resolve_task_types", "softmax_entropy", "unregister_task_type"]
