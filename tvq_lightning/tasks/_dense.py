"""What the dense task types (segmentation, depth, normal) share: heads, batches, masked per-pixel objectives.

- head: :class:`~tvq_lightning.models.dense.DenseHead`, a per-task decoder over the encoder's list
  of multi-scale features, built fresh (untrained) from the encoder's ``out_channels`` and trained
  with the encoder when fine-tuning (``trains_head``); saved as safetensors with its config;
- batches: ``(image, target)``; the target says itself which pixels are valid
  (:meth:`DenseTaskType.valid`);
- every objective is a masked mean of one per-pixel loss (:meth:`DenseTaskType.pixel_loss`): the
  supervised loss over the valid pixels, Tinting's pseudo-target loss over the kept pixels, and
  (types with ``adapts_to_expert``) AdaMerging's objective over every pixel of the expert's map;
- metrics: one dict-valued metric of :mod:`tvq_lightning.metrics` per entry of ``metric_infos``
  (:class:`~tvq_lightning.metrics.MetricEntry`), each an exact global per-pixel mean.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from ..errors import TvqError
from ..metrics import MetricEntry
from .base import TaskType, masked_mean


def default_unet_channels(stages: int) -> tuple[int, ...]:
    """UNet decoder widths for an encoder of ``stages`` stages: halving from the deepest block down
    to 16 (five stages: DenseHead's default (256, 128, 64, 32, 16); three: (64, 32, 16))."""
    return tuple(16 * 2 ** i for i in reversed(range(stages)))


class DenseTaskType(TaskType):
    """Base of the per-pixel task types (see the module docstring).

    Args:
        decoder: the DenseHead decoder built by :meth:`build_head` (``unet``, ``fpn``, ``deeplabv3``,
            ``deeplabv3plus``).
        decoder_channels: its widths (default: DenseHead's; a UNet gets one width per encoder stage,
            :func:`default_unet_channels`).
        head_options: further DenseHead keyword arguments (``atrous_rates``, ``dropout``, ...).
    """

    trains_head = True
    #: output channels of the head (None: the datamodule's class count).
    out_channels: ClassVar[int | None] = None
    #: ``{metric_infos name: key of the dict-valued metric}``.
    metric_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, decoder: str = "unet", decoder_channels: int | Sequence[int] | None = None,
                 head_options: Mapping[str, Any] | None = None):
        self.decoder = decoder
        self.decoder_channels = decoder_channels
        self.head_options = dict(head_options or {})

    # -- heads
    def encoder_channels(self, encoder: nn.Module, dataloader) -> list[int]:
        """The widths of the encoder's features: its ``out_channels``, or read off one batch."""
        channels = getattr(encoder, "out_channels", None)
        if channels is not None and not isinstance(channels, int):
            return [int(c) for c in channels]
        x = self.inputs(next(iter(dataloader)))[:1]
        with torch.no_grad():
            feats = encoder(x.to(next(encoder.parameters()).device))
        if isinstance(feats, Tensor):
            raise TvqError(f"a {self.name} head reads an encoder's list of multi-scale features; this encoder returns "
                           "one tensor (use a DenseEncoder)")
        return [int(f.shape[1]) for f in feats]

    def build_head(self, encoder: nn.Module, dataloader, num_outputs: int | None = None, **options: Any) -> nn.Module:
        from ..models.dense import DenseHead

        out = num_outputs if num_outputs is not None else self.out_channels
        if out is None:
            raise TvqError(f"a {self.name} head needs its output count (num_classes)")
        channels = self.encoder_channels(encoder, dataloader)
        widths = self.decoder_channels
        if widths is None and self.decoder == "unet":
            widths = default_unet_channels(len(channels) - 1)
        return DenseHead(channels, int(out), decoder=self.decoder, decoder_channels=widths, **self.head_options)

    def load_head(self, path: str | Path) -> nn.Module:
        from ..models.dense import DenseHead

        return DenseHead.load(path)

    def head_config(self, head: nn.Module) -> dict[str, Any]:
        return dict(getattr(head, "config", {}))

    def head_from_state(self, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> nn.Module | None:
        from ..models.dense import DenseHead

        if "encoder_channels" not in config:
            return None
        head = DenseHead(**config)
        head.load_state_dict(dict(state))
        return head

    def head_outputs(self, head: nn.Module) -> int | None:
        out = getattr(head, "out_channels", None)
        return int(out) if isinstance(out, int) else None

    def data_outputs(self, datamodule: Any, task: str) -> int | None:
        return self.out_channels

    # -- batches: (image, target); the target marks its own invalid pixels
    def targets(self, batch: Any) -> Tensor:
        return batch[1]

    # -- objectives
    @abstractmethod
    def valid(self, target: Tensor) -> Tensor:
        """``(B, H, W)`` bool: the pixels of ``target`` that have a ground truth."""

    @abstractmethod
    def pixel_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """``(B, H, W)``: the loss at every pixel (invalid pixels may hold anything finite)."""

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return masked_mean(self.pixel_loss(outputs, targets), self.valid(targets))

    def pseudo_target_loss(self, outputs: Tensor, target: Tensor, keep: Tensor) -> Tensor:
        return masked_mean(self.pixel_loss(outputs, target), keep)

    def adaptation_objective(self, outputs: Tensor) -> Tensor:
        raise TvqError(f"the {self.name} task type has no unsupervised objective of its own: AdaMerging minimises "
                       "its expert_objective against the expert's cached predictions (adapts_to_expert)")

    def pseudo_targets(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """The expert's prediction and confidence are read as the merged model's (:meth:`confidence`)."""
        return self.confidence(outputs)

    # -- metrics
    @abstractmethod
    def make_metric(self, num_outputs: int | None, **kwargs: Any) -> Metric:
        """A fresh dict-valued metric of this type (``kwargs``: torchmetrics options)."""

    def metrics(self, head: nn.Module) -> dict[str, Metric]:
        n = self.head_outputs(head)
        return {name: MetricEntry(self.make_metric(n), key) for name, key in self.metric_keys.items()}

    def batch_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """This batch's metrics (NaN where it has no valid pixel); never synchronised across processes."""
        m = self.make_metric(int(outputs.shape[1]), sync_on_compute=False).to(outputs.device)
        m.update(outputs.detach(), targets)
        values = m.compute()
        return {name: values[key] for name, key in self.metric_keys.items()}

    # -- Surgery on multi-scale features: the deepest map is the representation edited
    def feature_dim(self, head: nn.Module) -> int | None:
        return getattr(head, "in_channels", None)

    def map_features(self, fn, features):
        if isinstance(features, (list, tuple)):
            return type(features)([*features[:-1], super().map_features(fn, features[-1])])
        return super().map_features(fn, features)

    def feature_distance(self, features, target) -> Tensor:
        if isinstance(features, (list, tuple)):
            features, target = features[-1], target[-1]
        return super().feature_distance(features, target)


def local_mean(x: Tensor) -> Tensor:
    """The mean over each pixel's 3 x 3 neighbourhood (borders: over the pixels inside), per channel."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
