"""The abstract :class:`TaskType`: everything a module needs to know about one kind of task.

The modules (fine-tuning, merged evaluation, AdaMerging, Tinting, Surgery), the report callback
and the demo never look inside a head's output: they go through the task type of each task
(the torchmetrics idea of one shared set of steps). A type declares

- **its head** (:meth:`~TaskType.build_head`, :meth:`~TaskType.load_head`, :meth:`~TaskType.save_head`):
  per task, never merged. It maps the encoder's output (a ``(B, D)`` vector, a ``(B, C, H, W)``
  map, or a list of multi-scale maps for a dense decoder) to the task's output;
- **its batch adapter** (:meth:`~TaskType.inputs`, :meth:`~TaskType.targets`,
  :meth:`~TaskType.unlabelled`): labelled batches are ``(inputs, targets...)``; unlabelled
  adaptation batches are ``(indices, inputs)`` (the indices key per-sample caches);
- **its objectives**: the supervised :meth:`~TaskType.loss` (per-pixel losses mask invalid
  pixels themselves), the unsupervised :meth:`~TaskType.adaptation_objective` (AdaMerging,
  docs/algorithms.md §5) and :meth:`~TaskType.pseudo_target_loss` (Tinting); a type without an
  unsupervised objective of its own (depth, normals: no entropy) sets
  :attr:`~TaskType.adapts_to_expert`, and AdaMerging then minimises
  :meth:`~TaskType.expert_objective` against the task expert's pseudo-targets, cached once per
  sample as Tinting's are;
- **its metrics** (:meth:`~TaskType.metrics`: torchmetrics objects, all-reduced under DDP) with
  :attr:`~TaskType.metric_infos` (names as logged, ``{stage}/{name}/{task}``; the first is the
  *main* metric, with its direction);
- **what an expert gives and how sure a model is**: :meth:`~TaskType.pseudo_targets` (what the
  expert's output is cached as, per sample: labels, or maps for dense tasks),
  :meth:`~TaskType.confidence` (per sample or per pixel) and :meth:`~TaskType.keep` (Tinting++'s
  confidence-based sampling, element-wise).

Outputs of dense types are spatial, ``(B, C, H, W)``; their pseudo-targets, confidences and keep
masks are maps, and per-sample caches hold them as ``(N, ...)`` tensors indexed by sample.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from ..errors import TvqError


@dataclass(frozen=True)
class MetricInfo:
    """How a logged metric reads: its name (``{stage}/{name}/{task}``), its direction, and whether
    reports show it as a percentage (values in [0, 1] times 100)."""

    name: str
    higher_is_better: bool = True
    percent: bool = False


class TaskType(ABC):
    """One kind of task (classification, segmentation, depth, ...); see the module docstring.

    Subclasses are registered with :func:`~._registry.register_task_type`; instances are
    stateless, so one may serve several tasks.
    """

    name: ClassVar[str] = ""
    metric_infos: ClassVar[tuple[MetricInfo, ...]] = ()
    #: FineTuneModule trains the head with the encoder (dense decoders start untrained); the
    #: classification head stays frozen (the task-vector protocol).
    trains_head: ClassVar[bool] = False

    # -- heads --------------------------------------------------------------------------------------
    @abstractmethod
    def build_head(self, encoder: nn.Module, dataloader, num_outputs: int | None = None, **options: Any) -> nn.Module:
        """A head for ``encoder`` when none is given (fine-tuning); ``dataloader`` yields the task's
        labelled training batches (classification fits a linear probe on them)."""

    @abstractmethod
    def load_head(self, path: str | Path) -> nn.Module:
        """A head saved by :meth:`save_head`."""

    def save_head(self, head: nn.Module, path: str | Path) -> None:
        """Write ``head`` to ``path`` (a ``.safetensors`` file)."""
        if not hasattr(head, "save"):
            raise TvqError(f"a {type(head).__name__} head cannot be saved; give the {self.name} task type's own head")
        head.save(path)

    def head_config(self, head: nn.Module) -> dict[str, Any]:
        """What a checkpoint keeps, besides the head's state dict, to rebuild it (:meth:`head_from_state`)."""
        return {}

    def head_from_state(self, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> nn.Module | None:
        """The head a checkpoint holds (``state``: its tensors without the ``head.`` prefix), or None."""
        return None

    def head_outputs(self, head: nn.Module) -> int | None:
        """The head's output size (classes, channels), or None if it cannot tell."""
        return None

    def data_outputs(self, datamodule: Any, task: str) -> int | None:
        """The output size the datamodule gives task ``task`` (e.g. its class count), or None."""
        return None

    def check_head(self, task: str, head: nn.Module, expected: int | None, source: str) -> None:
        """Raise :class:`TvqError` if ``head`` does not fit ``expected`` outputs (from ``source``)."""
        got = self.head_outputs(head)
        if expected is not None and got is not None and got != expected:
            raise TvqError(f"the head of task {task!r} has {got} outputs but {source} gives {expected}; "
                           "use the head made for this task")

    def feature_dim(self, head: nn.Module) -> int | None:
        """The width of the encoder output the head reads (``in_features`` / ``in_channels``)."""
        return getattr(head, "in_features", None) or getattr(head, "in_channels", None)

    # -- batches ------------------------------------------------------------------------------------
    def inputs(self, batch: Any) -> Tensor:
        """The inputs of a labelled batch ``(inputs, targets, ...)`` (or of a batch of inputs only)."""
        return batch if isinstance(batch, Tensor) else batch[0]

    def targets(self, batch: Any) -> Any:
        """The targets of a labelled batch (a tensor, or a tuple such as ``(map, valid_mask)``)."""
        return batch[1] if len(batch) == 2 else tuple(batch[1:])

    def batch_size(self, batch: Any) -> int:
        return int(self.inputs(batch).shape[0])

    def unlabelled(self, item: Any) -> tuple[Tensor | None, Tensor]:
        """``(indices, inputs)`` of an unlabelled adaptation batch (``indices`` None when the batch
        is plain inputs)."""
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor) \
                and not item[0].is_floating_point() and item[0].dim() == 1:
            return item[0], item[1]
        if isinstance(item, Tensor):
            return None, item
        raise TvqError(f"an unlabelled {self.name} batch is (indices, inputs) or inputs; got {type(item).__name__}")

    # -- objectives ---------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, outputs: Tensor, targets: Any) -> Tensor:
        """The supervised loss (a scalar, mean over samples / valid pixels)."""

    @abstractmethod
    def adaptation_objective(self, outputs: Tensor) -> Tensor:
        """The unsupervised objective AdaMerging minimises (a scalar; docs/algorithms.md §5)."""

    #: AdaMerging minimises :meth:`expert_objective` against the task expert's pseudo-targets
    #: (:meth:`pseudo_targets`, computed once per sample when fitting starts) instead of
    #: :meth:`adaptation_objective` (for outputs without an entropy: depth, normals).
    adapts_to_expert: ClassVar[bool] = False

    def expert_objective(self, outputs: Tensor, target: Tensor, target_conf: Tensor) -> Tensor:
        """AdaMerging's objective for types with :attr:`adapts_to_expert`: ``outputs`` against the
        expert's cached ``(target, target_conf)``; by default :meth:`pseudo_target_loss` over every
        element."""
        return self.pseudo_target_loss(outputs, target, torch.ones_like(target_conf, dtype=torch.bool))

    def batch_metrics(self, outputs: Tensor, targets: Any) -> dict[str, Tensor]:
        """Per-batch values logged while fine-tuning (``train/<name>``), named as :attr:`metric_infos`."""
        return {}

    # -- metrics ------------------------------------------------------------------------------------
    @property
    def main_metric(self) -> str:
        return self.metric_infos[0].name

    @property
    def higher_is_better(self) -> bool:
        return self.metric_infos[0].higher_is_better

    def metric_info(self, name: str) -> MetricInfo:
        for info in self.metric_infos:
            if info.name == name:
                return info
        raise TvqError(f"task type {self.name!r} has no metric {name!r}")

    @abstractmethod
    def metrics(self, head: nn.Module) -> dict[str, Metric]:
        """Fresh torchmetrics objects ``{name: Metric}`` (all-reduced on ``compute()`` under DDP),
        one per :attr:`metric_infos` entry."""

    def update_metrics(self, metrics: Mapping[str, Metric], outputs: Tensor, targets: Any) -> None:
        for m in metrics.values():
            m.update(outputs, targets)

    @abstractmethod
    def score(self, outputs: Tensor, targets: Any) -> tuple[float, float]:
        """``(total, count)`` of the main metric on a batch: over a dataset it is ``sum total / sum count``."""

    # -- predictions, experts, confidence -----------------------------------------------------------
    @abstractmethod
    def predict(self, outputs: Tensor) -> Tensor:
        """The prediction (labels; label maps; value maps) from the head's outputs."""

    @abstractmethod
    def pseudo_targets(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(target, confidence)`` of an expert's outputs: what Tinting caches per sample (a label
        and its probability; a map and a per-pixel confidence for dense types)."""

    @abstractmethod
    def confidence(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(prediction, confidence)`` of a model's outputs, in the pseudo-targets' space."""

    def agree(self, a: Tensor, b: Tensor) -> Tensor:
        """Element-wise: do two predictions agree (labels: equal)."""
        return a == b

    def keep(self, target: Tensor, target_conf: Tensor, outputs: Tensor) -> Tensor:
        """Tinting++'s confidence-based sampling of ``outputs`` against the expert's cached
        ``(target, target_conf)``: a bool mask over the samples (pixels for dense types)."""
        pred, conf = self.confidence(outputs.detach())
        return self.keep_where(target, target_conf, pred, conf)

    def keep_where(self, target: Tensor, target_conf: Tensor, pred: Tensor, conf: Tensor) -> Tensor:
        """The rule, element-wise: keep where the expert and the model agree (``y_e == y_m``), or
        where they disagree and the expert is at least as confident (``c_e >= c_m``)."""
        return self.agree(target, pred) | (target_conf >= conf)

    @abstractmethod
    def pseudo_target_loss(self, outputs: Tensor, target: Tensor, keep: Tensor) -> Tensor:
        """The loss of ``outputs`` against the expert's ``target`` over the ``keep`` elements (at
        least one is kept)."""

    # -- features (Surgery) -------------------------------------------------------------------------
    def map_features(self, fn: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
        """Apply ``fn`` (on ``(..., D)`` vectors) to each position of the encoder's output:
        ``(B, D)`` as is, ``(B, C, H, W)`` along the channels."""
        if features.dim() <= 2:
            return fn(features)
        return fn(features.movedim(1, -1)).movedim(-1, 1)

    def feature_distance(self, features: Tensor, target: Tensor) -> Tensor:
        """Surgery's loss: the mean L1 distance to the expert's features."""
        return F.l1_loss(features, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true (all of them without a mask); zero (still
    differentiable) when nothing is valid."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(1)
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
