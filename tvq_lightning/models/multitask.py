"""An image encoder shared by all tasks plus one head per task: the object every module merges into.

The encoder's output may be a feature vector ``(B, D)``, a map ``(B, C, H, W)`` or a list of
multi-scale maps; a head is whatever the task's type reads it with (a classification head, a
whole dense decoder). Heads are per task and never merged.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..errors import TvqError


class MultiTaskModel(nn.Module):
    """``encoder(images) -> features``; ``heads[task](features) -> outputs`` (logits, maps).

    Only the encoder is merged; heads stay per task. ``encoder_prefix`` is the prefix of the
    encoder's keys in this module's state dict (``"encoder."``).
    """

    encoder_prefix = "encoder."

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def head(self, task: str) -> nn.Module:
        if task not in self.heads:
            raise TvqError(f"no head for task {task!r}; the model has heads for: {', '.join(self.heads)}")
        return self.heads[task]

    def features(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def forward(self, images: Tensor, task: str) -> Tensor:
        return self.head(task)(self.encoder(images))
