"""Image classification: one logit vector per image (the first task type; the demo's and every config's).

- head: :class:`~tvq_lightning.models.heads.ClassificationHead` (zero-shot rows or a linear probe
  fitted on the frozen encoder's features, :func:`~tvq_lightning.models.probe.fit_linear_probe`);
  it stays frozen while fine-tuning;
- loss: cross-entropy; adaptation objective: the mean Shannon entropy of the softmax (AdaMerging);
- metrics: ``acc`` (micro ``MulticlassAccuracy``, logged ``{stage}/acc/{task}`` and reported in %);
- expert pseudo-target: the argmax label, confidence: the maximum softmax probability; Tinting's
  pseudo-target loss is the cross-entropy on the kept samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from ..errors import TvqError
from ._registry import register_task_type
from .base import MetricInfo, TaskType


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` (AdaMerging's loss)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


@register_task_type("classification")
class Classification(TaskType):
    """Image classification with a :class:`~tvq_lightning.models.heads.ClassificationHead` per task."""

    metric_infos = (MetricInfo("acc", higher_is_better=True, percent=True),)

    # -- heads
    def build_head(self, encoder: nn.Module, dataloader, num_outputs: int | None = None, steps: int = 300,
                   **options: Any) -> nn.Module:
        from ..models.probe import fit_linear_probe

        if num_outputs is None:
            raise TvqError("a classification head needs the class count (num_classes)")
        return fit_linear_probe(encoder, dataloader, int(num_outputs), steps=steps, **options)

    def load_head(self, path: str | Path) -> nn.Module:
        from ..models.heads import ClassificationHead

        return ClassificationHead.load(path)

    def head_config(self, head: nn.Module) -> dict[str, Any]:
        return {"normalize": getattr(head, "normalize", True)}

    def head_from_state(self, state, config) -> nn.Module | None:
        from ..models.heads import ClassificationHead

        if "weight" not in state:
            return None
        return ClassificationHead(state["weight"], state.get("bias"), normalize=config.get("normalize", True) is not False)

    def head_outputs(self, head: nn.Module) -> int | None:
        return getattr(head, "num_classes", None)

    def data_outputs(self, datamodule: Any, task: str) -> int | None:
        fn = getattr(datamodule, "num_classes", None)
        return int(fn(task)) if callable(fn) else None

    def check_head(self, task: str, head: nn.Module, expected: int | None, source: str) -> None:
        got = self.head_outputs(head)
        if expected is not None and got is not None and got != expected:
            raise TvqError(f"the head of task {task!r} has {got} classes but {source} gives {expected}; "
                           "use the head made for this task's classes")

    # -- objectives
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def adaptation_objective(self, outputs: Tensor) -> Tensor:
        return softmax_entropy(outputs).mean()

    def batch_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {"acc": (outputs.argmax(-1) == targets).float().mean()}

    # -- metrics
    def metrics(self, head: nn.Module) -> dict[str, Metric]:
        return {"acc": MulticlassAccuracy(num_classes=int(self.head_outputs(head)), average="micro")}

    def score(self, outputs: Tensor, targets: Tensor) -> tuple[int, int]:
        return int((outputs.argmax(-1) == targets).sum()), int(targets.shape[0])

    # -- predictions, experts, confidence
    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.argmax(-1)

    def pseudo_targets(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        conf, labels = outputs.softmax(-1).max(-1)
        return labels, conf

    def confidence(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        conf, labels = outputs.softmax(-1).max(-1)
        return labels, conf

    def pseudo_target_loss(self, outputs: Tensor, target: Tensor, keep: Tensor) -> Tensor:
        return F.cross_entropy(outputs[keep], target[keep])
